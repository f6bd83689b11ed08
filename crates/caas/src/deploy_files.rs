//! Tests that keep the deployment files true: every example TOML under `config/` loads with
//! the loader that reads it in production, and so does every TOML snippet of
//! `docs/deploy.md` (merged over the key-service example, as the text tells operators to do).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Loads `path` with the loader its name says it is for.
fn load(path: &Path) -> Result<&'static str, String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    if name.starts_with("key-service") {
        crate::key_service::config::load(path)?.validate()?;
        Ok("key service")
    } else if name.starts_with("host-agent") {
        caas_host::config::load(path).map_err(|e| e.to_string())?;
        Ok("host agent")
    } else if name.starts_with("security-profile") {
        crate::key_service::config::read_profile(path)?;
        Ok("security profile")
    } else {
        Err(format!(
            "{}: no loader for this example (name it key-service*, host-agent* or \
             security-profile*, or add its loader here)",
            path.display()
        ))
    }
}

#[test]
fn every_example_config_loads_with_its_real_loader() {
    let mut seen = Vec::new();
    for e in std::fs::read_dir(repo().join("config")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let what = load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            seen.push(what);
        }
    }
    for role in ["key service", "host agent", "security profile"] {
        assert!(seen.contains(&role), "no example config for the {role}");
    }
}

/// The ```toml blocks of docs/deploy.md are key-service settings "that differ from the
/// example": each, merged over `config/key-service.example.toml`, must load.
#[test]
fn the_deploy_guides_config_snippets_load() {
    let doc = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let example: toml::Table = toml::from_str(
        &std::fs::read_to_string(repo().join("config/key-service.example.toml")).unwrap(),
    )
    .unwrap();
    let mut blocks = 0;
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("```toml\n") {
        let body = &rest[i + 8..];
        let end = body.find("```").unwrap();
        let snippet: toml::Table = toml::from_str(&body[..end])
            .unwrap_or_else(|e| panic!("docs/deploy.md TOML block: {e}\n{}", &body[..end]));
        let mut merged = example.clone();
        for (section, v) in snippet {
            match (merged.get_mut(&section), v) {
                (Some(toml::Value::Table(m)), toml::Value::Table(t)) => m.extend(t),
                (_, v) => {
                    merged.insert(section, v);
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key-service.toml");
        std::fs::write(&f, toml::to_string(&merged).unwrap()).unwrap();
        crate::key_service::config::load(&f)
            .and_then(|r| r.validate())
            .unwrap_or_else(|e| panic!("docs/deploy.md TOML block does not load: {e}"));
        blocks += 1;
        rest = &body[end..];
    }
    assert!(blocks >= 1, "docs/deploy.md has no key-service TOML block");
}
