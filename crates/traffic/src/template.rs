//! consul-template-like rendering: any minijinja template, with the
//! [`Snapshot`](crate::Snapshot) as its context (`apps`, each with `name`,
//! `bind`, `health_path`, `canary_share`, `production` and `canary` lists of
//! servers with `name`, `address`, `port`, `weight`, `draining`).
//!
//! Undefined variables are errors (strict), so a typo fails loudly instead
//! of rendering an empty pool.

use minijinja::{Environment, UndefinedBehavior};

use crate::{Error, Result, Snapshot};

/// Renders `source` (named `name` in messages) with `snapshot` as context.
pub fn render(name: &str, source: &str, snapshot: &Snapshot) -> Result<String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let err = |e: minijinja::Error| Error::Template {
        name: name.to_owned(),
        message: match e.line() {
            Some(line) => format!("line {line}: {e}"),
            None => e.to_string(),
        },
    };
    env.add_template(name, source).map_err(err)?;
    let template = env.get_template(name).map_err(err)?;
    template
        .render(minijinja::Value::from_serialize(snapshot))
        .map_err(err)
}

/// Renders `source` and writes it to `path` atomically (temp file in the same
/// directory, then rename); returns true if the content changed.
pub fn render_to_file(
    name: &str,
    source: &str,
    snapshot: &Snapshot,
    path: &std::path::Path,
) -> Result<bool> {
    let text = render(name, source, snapshot)?;
    crate::haproxy::write_atomically(path, &text)
}
