//! Labelled image files, listed from the two layouts PyTorch users bring: torchvision's
//! `ImageFolder` (`DIR/<class>/**/*.png|jpg|jpeg`, classes sorted by name, hidden files ignored)
//! and a CSV of `file,label` rows (the custom `Dataset` of the PyTorch tutorials; header
//! optional, paths relative to the CSV, labels as class ids or class names).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use walkdir::WalkDir;

/// The largest class count: labels are bytes, and one id is kept for the null label.
pub const MAX_CLASSES: usize = 255;

/// One labelled file; `row` is its 1-based line in a CSV (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub label: u8,
    pub row: Option<usize>,
}

impl Entry {
    /// The file, and the CSV row that named it.
    pub fn describe(&self) -> String {
        match self.row {
            Some(r) => format!("{} (CSV row {r})", self.path.display()),
            None => self.path.display().to_string(),
        }
    }
}

/// The class names (index = label) and the files, in a fixed order: classes by name then paths
/// by name for folders, row order for CSVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileList {
    pub classes: Vec<String>,
    pub entries: Vec<Entry>,
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with('.'))
}

/// Whether the name ends in an image extension dits decodes (any case).
pub fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The visible subdirectories of `dir`, sorted by name.
pub fn subdirectories(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if is_hidden(&entry.file_name()) || !entry.path().is_dir() {
            continue;
        }
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            Err(name) => bail!("{}: the folder name {name:?} is not UTF-8", dir.display()),
        }
    }
    names.sort();
    Ok(names)
}

/// An image folder: one subdirectory per class. With `known`, the classes of the training split:
/// a folder outside them is an error, and labels follow their order.
pub fn list_folder(root: &Path, known: Option<&[String]>) -> anyhow::Result<FileList> {
    let found = subdirectories(root)?;
    ensure!(!found.is_empty(), "{}: no class folders (an image folder holds DIR/<class>/<image>.png)", root.display());
    let classes = match known {
        Some(known) => {
            if let Some(stray) = found.iter().find(|c| !known.contains(c)) {
                bail!("{}: class folder {stray:?} is not among the training classes", root.display());
            }
            known.to_vec()
        }
        None => found.clone(),
    };
    ensure!(classes.len() <= MAX_CLASSES, "{}: {} classes, at most {MAX_CLASSES}", root.display(), classes.len());
    let mut entries = Vec::new();
    for name in &found {
        let label = classes.iter().position(|c| c == name).expect("a found class is known") as u8;
        let dir = root.join(name);
        let before = entries.len();
        let walk = WalkDir::new(&dir).follow_links(true).sort_by_file_name().into_iter();
        for file in walk.filter_entry(|e| e.depth() == 0 || !is_hidden(e.file_name())) {
            let file = file.with_context(|| format!("reading {}", dir.display()))?;
            if file.file_type().is_file() && is_image_name(file.path()) {
                entries.push(Entry { path: file.into_path(), label, row: None });
            }
        }
        ensure!(entries.len() > before, "{}: class folder holds no .png, .jpg or .jpeg file", dir.display());
    }
    Ok(FileList { classes, entries })
}

/// Header names a CSV's first row may carry instead of a file and a label.
fn is_header(file: &str, label: &str) -> bool {
    !is_image_name(Path::new(file)) && label.parse::<u64>().is_err()
}

/// A CSV of `file,label` rows. Labels are class ids when every one is an integer (classes
/// `0..=max`, named by their ids), otherwise class names (sorted, as folders are). With `known`
/// (the training split's classes, or `classes.txt`), ids must be below its length and names in
/// it.
pub fn list_csv(csv_path: &Path, known: Option<&[String]>) -> anyhow::Result<FileList> {
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_path(csv_path)
        .with_context(|| format!("reading {}", csv_path.display()))?;
    let mut rows: Vec<(usize, String, String)> = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("{}", csv_path.display()))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.iter().all(str::is_empty) {
            continue;
        }
        ensure!(
            record.len() == 2,
            "{} row {line}: {} fields, expected 2 (file,label)",
            csv_path.display(),
            record.len()
        );
        let (file, label) = (record[0].to_string(), record[1].to_string());
        if rows.is_empty() && is_header(&file, &label) {
            continue;
        }
        ensure!(!file.is_empty() && !label.is_empty(), "{} row {line}: empty file or label", csv_path.display());
        rows.push((line, file, label));
    }
    ensure!(!rows.is_empty(), "{}: no rows (expected file,label lines)", csv_path.display());

    let numeric = rows.iter().all(|(_, _, l)| l.parse::<u64>().is_ok());
    let classes: Vec<String> = match known {
        Some(known) => known.to_vec(),
        None if numeric => {
            let max = rows.iter().map(|(_, _, l)| l.parse::<u64>().unwrap()).max().unwrap_or(0);
            ensure!(
                (max as usize) < MAX_CLASSES,
                "{}: label {max} is out of range (at most {MAX_CLASSES} classes)",
                csv_path.display()
            );
            (0..=max).map(|i| i.to_string()).collect()
        }
        None => {
            let mut names: Vec<String> = rows.iter().map(|(_, _, l)| l.clone()).collect();
            names.sort();
            names.dedup();
            ensure!(
                names.len() <= MAX_CLASSES,
                "{}: {} classes, at most {MAX_CLASSES}",
                csv_path.display(),
                names.len()
            );
            names
        }
    };
    let mut entries = Vec::with_capacity(rows.len());
    for (line, file, label) in rows {
        let id = match classes.iter().position(|c| *c == label) {
            Some(i) => i,
            None => match label.parse::<usize>() {
                Ok(i) if numeric || known.is_some() => {
                    ensure!(
                        i < classes.len(),
                        "{} row {line}: label {i} is out of range ({} classes)",
                        csv_path.display(),
                        classes.len()
                    );
                    i
                }
                _ => bail!("{} row {line}: unknown class {label:?}", csv_path.display()),
            },
        };
        let path = base.join(&file);
        ensure!(path.is_file(), "{} row {line}: no file {}", csv_path.display(), path.display());
        entries.push(Entry { path, label: id as u8, row: Some(line) });
    }
    Ok(FileList { classes, entries })
}

/// Class names from a `classes.txt`-style file: one per non-empty line, distinct.
pub fn read_class_names(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    ensure!(!names.is_empty(), "{}: no class names", path.display());
    ensure!(names.len() <= MAX_CLASSES, "{}: {} classes, at most {MAX_CLASSES}", path.display(), names.len());
    for (i, n) in names.iter().enumerate() {
        ensure!(!names[..i].contains(n), "{}: class {n:?} is named twice", path.display());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn folders_sort_classes_and_files_and_skip_hidden_and_other_files() {
        let d = tempfile::tempdir().unwrap();
        for p in ["dog/b.png", "dog/a.JPG", "dog/sub/c.jpeg", "cat/z.png", "cat/.hidden.png", "cat/notes.txt"] {
            touch(&d.path().join(p));
        }
        touch(&d.path().join(".git/x.png"));
        let list = list_folder(d.path(), None).unwrap();
        assert_eq!(list.classes, ["cat", "dog"]);
        let names: Vec<_> =
            list.entries.iter().map(|e| (e.path.strip_prefix(d.path()).unwrap().to_owned(), e.label)).collect();
        let expect = [("cat/z.png", 0), ("dog/a.JPG", 1), ("dog/b.png", 1), ("dog/sub/c.jpeg", 1)];
        assert_eq!(names, expect.map(|(p, l)| (PathBuf::from(p), l)));
    }

    #[test]
    fn empty_class_folders_and_unknown_test_classes_are_errors() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("a/1.png"));
        std::fs::create_dir(d.path().join("b")).unwrap();
        let err = list_folder(d.path(), None).unwrap_err().to_string();
        assert!(err.contains("holds no .png") && err.contains('b'), "{err}");
        std::fs::remove_dir(d.path().join("b")).unwrap();
        touch(&d.path().join("c/1.png"));
        let err = list_folder(d.path(), Some(&["a".into()])).unwrap_err().to_string();
        assert!(err.contains("\"c\" is not among"), "{err}");
        // A test split may lack classes; its labels follow the training order.
        let list = list_folder(d.path(), Some(&["z".into(), "c".into(), "a".into()])).unwrap();
        assert_eq!(list.entries.iter().map(|e| e.label).collect::<Vec<_>>(), [2, 1]);
        let empty = tempfile::tempdir().unwrap();
        assert!(list_folder(empty.path(), None).unwrap_err().to_string().contains("no class folders"));
    }

    fn csv_dir(rows: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["a.png", "img/b.png", "c.png"] {
            touch(&d.path().join(f));
        }
        std::fs::write(d.path().join("list.csv"), rows).unwrap();
        d
    }

    #[test]
    fn csv_labels_as_ids_or_names_with_an_optional_header() {
        let d = csv_dir("file,label\na.png,2\nimg/b.png,0\n");
        let list = list_csv(&d.path().join("list.csv"), None).unwrap();
        assert_eq!(list.classes, ["0", "1", "2"]);
        assert_eq!(list.entries.iter().map(|e| (e.label, e.row)).collect::<Vec<_>>(), [(2, Some(2)), (0, Some(3))]);
        assert_eq!(list.entries[1].path, d.path().join("img/b.png"));

        let d = csv_dir("a.png, dog\n\"img/b.png\",cat\nc.png,dog\n");
        let list = list_csv(&d.path().join("list.csv"), None).unwrap();
        assert_eq!(list.classes, ["cat", "dog"]);
        assert_eq!(list.entries.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 1]);
    }

    #[test]
    fn csv_rows_naming_missing_files_or_unknown_classes_are_errors_with_the_row() {
        let d = csv_dir("a.png,0\nmissing.png,1\n");
        let err = list_csv(&d.path().join("list.csv"), None).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("missing.png"), "{err}");
        let known = ["cat".to_string(), "dog".to_string()];
        let d = csv_dir("a.png,cat\nc.png,horse\n");
        let err = list_csv(&d.path().join("list.csv"), Some(&known)).unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("unknown class \"horse\""), "{err}");
        let d = csv_dir("a.png,1\nc.png,7\n");
        let err = list_csv(&d.path().join("list.csv"), Some(&known)).unwrap_err().to_string();
        assert!(err.contains("row 2: label 7 is out of range (2 classes)"), "{err}");
        let d = csv_dir("a.png,1,extra\n");
        assert!(list_csv(&d.path().join("list.csv"), None).unwrap_err().to_string().contains("3 fields"));
        let d = csv_dir("file,label\n");
        assert!(list_csv(&d.path().join("list.csv"), None).unwrap_err().to_string().contains("no rows"));
    }

    #[test]
    fn class_name_files_must_name_distinct_classes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("classes.txt");
        std::fs::write(&p, "airplane\n\nautomobile\n").unwrap();
        assert_eq!(read_class_names(&p).unwrap(), ["airplane", "automobile"]);
        std::fs::write(&p, "a\na\n").unwrap();
        assert!(read_class_names(&p).unwrap_err().to_string().contains("named twice"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any rows the CSV writer produces (quoted names with commas and spaces, numeric or
        /// named labels) list back to the same files and labels, in row order.
        #[test]
        fn csv_round_trips(names in proptest::collection::vec("[a-z ,]{1,8}", 1..12), named in any::<bool>()) {
            let d = tempfile::tempdir().unwrap();
            let mut w = csv::Writer::from_path(d.path().join("l.csv")).unwrap();
            w.write_record(["file", "label"]).unwrap();
            for (i, n) in names.iter().enumerate() {
                let file = format!("{i} {n}.png");
                touch(&d.path().join(&file));
                let label = if named { format!("class {}", i % 3) } else { (i % 3).to_string() };
                w.write_record([file.as_str(), label.as_str()]).unwrap();
            }
            w.flush().unwrap();
            let list = list_csv(&d.path().join("l.csv"), None).unwrap();
            prop_assert_eq!(list.entries.len(), names.len());
            for (i, e) in list.entries.iter().enumerate() {
                prop_assert_eq!(&e.path, &d.path().join(format!("{i} {}.png", names[i])));
                prop_assert_eq!(e.label as usize, i % 3);
            }
        }

        /// Whatever bytes a CSV holds, listing it returns or errs; it never panics.
        #[test]
        fn csv_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let d = tempfile::tempdir().unwrap();
            touch(&d.path().join("a.png"));
            std::fs::write(d.path().join("l.csv"), &bytes).unwrap();
            let _ = list_csv(&d.path().join("l.csv"), None);
        }

        /// Any tree of class folders lists every image exactly once, under its folder's label.
        #[test]
        fn folders_list_every_image_once(counts in proptest::collection::vec(1usize..4, 1..5)) {
            let d = tempfile::tempdir().unwrap();
            for (c, &n) in counts.iter().enumerate() {
                for i in 0..n {
                    touch(&d.path().join(format!("class{c}/{i}.png")));
                }
            }
            let list = list_folder(d.path(), None).unwrap();
            prop_assert_eq!(list.classes.len(), counts.len());
            let per: Vec<usize> = (0..counts.len()).map(|c| list.entries.iter().filter(|e| e.label as usize == c).count()).collect();
            prop_assert_eq!(per, counts);
        }
    }
}
