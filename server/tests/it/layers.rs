//! The crates' modules import each other in one direction only: no circle of imports between modules.
//!
//! Every file is one module (`foo/mod.rs` is `foo`). An edge A -> B is any path in A that names B:
//! `use crate::b::...`, `crate::b::x` written inline, or `super::...` resolved from A; a path names the
//! longest module it reaches. A parent naming its own children is left out (declaring children is not
//! an import), and so are comments and test modules. A circle is a strongly connected component of more
//! than one module. `cargo test -p bridge-server --test it layers -- --nocapture` prints the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;

/// Module name (`a::b`, "" for the crate root) -> its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            if parts.last().is_some_and(|p| p == "tests") {
                continue;
            }
            out.insert(parts.join("::"), path);
        }
    }
    out
}

/// The source without comments and without an inline `mod tests`.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    Regex::new(r"//[^\n]*")
        .unwrap()
        .replace_all(text, "")
        .into_owned()
}

fn imports(module: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let here: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    let resolve = |head: &str, tail: &str| -> Option<String> {
        let mut parts: Vec<&str> = tail.split("::").filter(|p| !p.is_empty()).collect();
        let mut base: Vec<&str> = if head == "crate" {
            Vec::new()
        } else {
            here[..here.len().saturating_sub(1)].to_vec()
        };
        if head == "super" {
            while parts.first() == Some(&"super") {
                base.pop();
                parts.remove(0);
            }
        }
        base.extend(parts);
        (1..=base.len())
            .rev()
            .map(|n| base[..n].join("::"))
            .find(|name| known.contains(name))
    };
    let mut found = BTreeSet::new();
    let group = Regex::new(r"\b(crate|super)((?:::\w+)*)::\{([^;]*?)\}").unwrap();
    for m in group.captures_iter(text) {
        for item in m[3].split(',') {
            let item = item.split(" as ").next().unwrap().trim();
            let item = item.split("::{").next().unwrap();
            let target = if item.is_empty() || item == "self" {
                resolve(&m[1], &m[2])
            } else {
                resolve(&m[1], &format!("{}::{item}", &m[2]))
            };
            found.extend(target);
        }
    }
    let path = Regex::new(r"\b(crate|super)((?:::\w+)+)").unwrap();
    for m in path.captures_iter(text) {
        found.extend(resolve(&m[1], &m[2]));
    }
    found.remove(module);
    let prefix = format!("{module}::");
    found
        .into_iter()
        .filter(|t| !t.is_empty() && (module.is_empty() || !t.starts_with(&prefix)))
        .collect()
}

/// Tarjan's strongly connected components.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.out
}

fn graph_of(crate_dir: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src");
    let modules = modules(&src);
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, path)| {
            let text = code(&std::fs::read_to_string(path).unwrap());
            (name.clone(), imports(name, &text, &known))
        })
        .collect()
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    let mut failures = Vec::new();
    for krate in ["server", "agent", "sim", "control-proto", "firmware-proto"] {
        let graph = graph_of(krate);
        let edges: usize = graph.values().map(BTreeSet::len).sum();
        let found = circles(&graph);
        println!(
            "{krate}: {} modules, {edges} imports, {} circle(s)",
            graph.len(),
            found.len()
        );
        for circle in found {
            failures.push(format!("{krate}: {}", circle.join(" <-> ")));
        }
    }
    assert!(
        failures.is_empty(),
        "import circles:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_checker_finds_a_circle_when_there_is_one() {
    let known: BTreeSet<String> = ["a", "b", "b::c"].map(String::from).into();
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", "use crate::b::c::Thing;"),
        ("b", "pub mod c;"),
        (
            "b::c",
            "use super::super::a::Other; // crate::b is only named here",
        ),
    ]
    .into_iter()
    .map(|(m, t)| (m.to_string(), imports(m, &code(t), &known)))
    .collect();
    assert_eq!(graph["a"], ["b::c".to_string()].into());
    assert!(graph["b"].is_empty(), "a parent's children are not imports");
    assert_eq!(
        circles(&graph),
        vec![vec!["a".to_string(), "b::c".to_string()]]
    );
}

/// The server's services sit below its HTTP layer: they take the parts of the server they use (a pool,
/// the agents' hub, `dongles::Services`) rather than the whole application state, and answer with
/// their own errors, which `routes` maps to the API's. Only HTTP entry points that live beside their
/// domain may name that layer, and the services not yet moved are listed so that the list only shrinks.
#[test]
fn the_servers_services_do_not_reach_up_to_the_http_layer() {
    const UPPER: [&str; 6] = ["app", "state", "http", "routes", "web", "openapi"];
    // Extractors and WebSocket handlers: HTTP entry points themselves.
    const ENTRY_POINTS: [&str; 3] = ["auth::caller", "agents::ws", "groups::data_ws"];
    // Services that still take the whole state or answer with HTTP errors.
    const NOT_YET: [&str; 0] = [];
    let is_upper = |m: &str| {
        UPPER
            .iter()
            .any(|u| m == *u || m.strip_prefix(u).is_some_and(|rest| rest.starts_with("::")))
    };
    let graph = graph_of("server");
    let reaching_up: BTreeSet<&str> = graph
        .iter()
        .filter(|(module, imports)| {
            !module.is_empty() && !is_upper(module) && imports.iter().any(|i| is_upper(i))
        })
        .map(|(module, _)| module.as_str())
        .collect();
    let allowed: BTreeSet<&str> = ENTRY_POINTS.into_iter().chain(NOT_YET).collect();
    let unexpected: Vec<&&str> = reaching_up.difference(&allowed).collect();
    assert!(
        unexpected.is_empty(),
        "these services import the HTTP layer or the whole state: {unexpected:?}"
    );
    let moved: Vec<&&str> = NOT_YET
        .iter()
        .filter(|m| !reaching_up.contains(*m))
        .collect();
    assert!(
        moved.is_empty(),
        "these no longer reach up: take them off NOT_YET: {moved:?}"
    );
    let below = graph
        .keys()
        .filter(|m| !m.is_empty() && !is_upper(m) && !reaching_up.contains(m.as_str()))
        .count();
    println!(
        "server: {below} modules below the HTTP layer, {} entry points and {} services still reaching up",
        ENTRY_POINTS.len(),
        NOT_YET.len()
    );
}
