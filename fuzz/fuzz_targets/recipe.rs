//! The TOML recipe parser on arbitrary text: a recipe or an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = dits::train::recipe::RecipeFile::parse(text, std::path::Path::new("fuzz.toml")) {
        assert!(e.to_string().starts_with("fuzz.toml"));
    }
});
