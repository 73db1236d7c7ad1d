//! The page at `GET /`: a button per class, the sampling settings, and the drawn PNG. One
//! self-contained file (no network); the model's facts go in as JSON, which the page's script
//! reads and puts on the page as text, so a class name is never markup.

use clap::ValueEnum;
use serde_json::json;

use super::query::Bounds;
use crate::diffusion::SamplerKind;
use crate::diffusion::defaults::DEFAULT_SAMPLER;

const TEMPLATE: &str = include_str!("page.html");

pub fn render(model: &str, bounds: &Bounds) -> String {
    let name = |k: &SamplerKind| k.to_possible_value().map(|p| p.get_name().to_string());
    let config = json!({
        "model": model,
        "classes": bounds.class_names,
        "guidable": bounds.guidable,
        "max_images": bounds.max_images,
        "max_steps": bounds.steps_limit(),
        "default_steps": bounds.default_steps(),
        "default_cfg": bounds.default_cfg(),
        "samplers": SamplerKind::value_variants().iter().filter_map(name).collect::<Vec<_>>(),
        "default_sampler": name(&DEFAULT_SAMPLER),
    });
    // Inside <script>, only "</" could end the element early; "<" as \u003c is still JSON.
    TEMPLATE.replace("{{CONFIG}}", &config.to_string().replace('<', "\\u003c"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_cannot_close_the_script() {
        let bounds = Bounds {
            class_names: vec!["</script><script>alert(1)</script>".into(), "ok".into()],
            guidable: false,
            timesteps: 1000,
            max_images: 16,
            max_steps: 100,
        };
        let page = render("a <b> model", &bounds);
        assert_eq!(page.matches("</script>").count(), TEMPLATE.matches("</script>").count());
        let start = page.find("type=\"application/json\">").unwrap() + "type=\"application/json\">".len();
        let end = start + page[start..].find("</script>").unwrap();
        let config: serde_json::Value = serde_json::from_str(&page[start..end]).unwrap();
        assert_eq!(config["classes"][0], "</script><script>alert(1)</script>");
        assert_eq!(config["model"], "a <b> model");
        assert_eq!(config["default_sampler"], "euler");
    }
}
