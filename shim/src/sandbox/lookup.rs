//! Finding a sandbox by its id or a unique prefix of it (as `shoji ps` shows them), in the
//! run directory or among the kept logs.
use std::path::Path;

/// Where to look for an id prefix: a directory and which of its entries count.
pub type Place<'a> = (&'a Path, &'a dyn Fn(&Path) -> bool);

/// The entry named `prefix`, or the one entry whose name starts with it, in the first of
/// `places` that has it, with the index of that place. None when nothing matches; an error
/// for an id that is no id and for an ambiguous prefix.
pub fn unique_prefix(places: &[Place], prefix: &str) -> Result<Option<(String, usize)>, String> {
    if super::validate_id("sandbox id", prefix).is_err() {
        return Err(format!("{prefix:?} is not a sandbox id"));
    }
    if let Some(i) = places.iter().position(|(dir, ok)| ok(&dir.join(prefix))) {
        return Ok(Some((prefix.into(), i)));
    }
    let mut found: Vec<(String, usize)> = Vec::new();
    for (i, (dir, ok)) in places.iter().enumerate() {
        for name in std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
        {
            if name.starts_with(prefix)
                && ok(&dir.join(&name))
                && !found.iter().any(|f| f.0 == name)
            {
                found.push((name, i));
            }
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        n => Err(format!(
            "{prefix} names {n} sandboxes: {}",
            found
                .iter()
                .map(|f| f.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
