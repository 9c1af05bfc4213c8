//! Registers every built-in module found in `modules/`.
//!
//! Each `modules/<name>.rs` provides `Settings` (its `[modules.<name>]` keys),
//! `PRIORITY` (its default place in the pipeline) and
//! `build(Settings, &BuildEnv) -> Result<Box<dyn Module>, String>`.
//! This script writes `$OUT_DIR/modules.rs`, which declares the files as modules,
//! a typed `ModulesConfig` with one section per module, and `build_all`, so adding
//! a file adds a module with no other edit.

use std::fmt::Write as _;
use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("modules");
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .map(|path| {
            println!("cargo:rerun-if-changed={}", path.display());
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            assert!(
                valid,
                "module file {} must be named in snake_case",
                path.display()
            );
            name
        })
        .collect();
    names.sort();

    let mut out = String::new();
    for name in &names {
        let path = dir.join(format!("{name}.rs"));
        writeln!(
            out,
            "#[path = {:?}]\npub mod {name};",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str(
        "\n/// One `[modules.<name>]` section per built-in module.\n\
         #[derive(Debug, Default, serde::Deserialize)]\n\
         #[serde(deny_unknown_fields)]\n\
         pub struct ModulesConfig {\n",
    );
    for name in &names {
        writeln!(out, "    #[serde(default)]\n    pub {name}: crate::pipeline::ModuleSection<{name}::Settings>,").unwrap();
    }
    out.push_str(
        "}\n\n/// Builds every enabled built-in module as a pipeline stage.\n\
         pub fn build_all(config: &ModulesConfig, env: &crate::pipeline::BuildEnv) \
         -> Result<Vec<crate::pipeline::Stage>, crate::pipeline::ModuleError> {\n    \
         let mut stages = Vec::new();\n",
    );
    for name in &names {
        writeln!(
            out,
            "    if let Some(stage) = config.{name}.build({name:?}, {name}::PRIORITY, env, {name}::build)? {{\n        stages.push(stage);\n    }}"
        )
        .unwrap();
    }
    out.push_str("    Ok(stages)\n}\n");

    fs::write(
        Path::new(&env::var("OUT_DIR").unwrap()).join("modules.rs"),
        out,
    )
    .unwrap();
}
