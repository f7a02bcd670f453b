//! The workspace's shape, checked: which crate may depend on which (the shipped picker on
//! nothing of the lab), what the shipped crate's dependency tree may not contain, and that no
//! crate has an import cycle among its modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Each workspace package and the workspace packages it may use (normal dependencies).
const ALLOWED: &[(&str, &[&str])] = &[
    ("fleetpick-protocol", &[]),
    ("fleetpick-config", &["fleetpick-protocol"]),
    (
        "fleetpick-core",
        &["fleetpick-protocol", "fleetpick-config"],
    ),
    ("fleetpick-envoy", &["fleetpick-protocol"]),
    (
        "fleetpick",
        &[
            "fleetpick-protocol",
            "fleetpick-config",
            "fleetpick-core",
            "fleetpick-envoy",
        ],
    ),
    ("fleetpick-sim", &["fleetpick-protocol"]),
    ("fleetpick-loadgen", &["fleetpick-protocol"]),
    (
        "fleetpick-lab",
        &[
            "fleetpick",
            "fleetpick-protocol",
            "fleetpick-config",
            "fleetpick-core",
            "fleetpick-envoy",
            "fleetpick-sim",
            "fleetpick-loadgen",
        ],
    ),
];

fn cargo() -> std::process::Command {
    let mut c = std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    c.current_dir(fleetpick_envoy::repo_root());
    c
}

#[test]
fn crates_depend_only_on_what_the_layout_allows() {
    let out = fleetpick_tests::succeeds(cargo().args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
        "--offline",
    ]));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: BTreeSet<&str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for package in meta["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap();
        let used: BTreeSet<&str> = package["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null() && members.contains(d["name"].as_str().unwrap()))
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        if name == "fleetpick-tests" {
            continue; // The tests may use anything.
        }
        let allowed: BTreeSet<&str> = ALLOWED
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not in the layout's table: add it"))
            .1
            .iter()
            .copied()
            .collect();
        let extra: Vec<_> = used.difference(&allowed).collect();
        assert!(extra.is_empty(), "{name} may not depend on {extra:?}");
    }
}

#[test]
fn the_shipped_crate_carries_nothing_of_the_lab() {
    let out = fleetpick_tests::succeeds(cargo().args([
        "tree",
        "-p",
        "fleetpick",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--offline",
    ]));
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: BTreeSet<&str> = tree.lines().filter_map(|l| l.split(' ').next()).collect();
    assert!(names.contains("tonic"), "the tree was read: {names:?}");
    for lab in [
        "fleetpick-sim",
        "fleetpick-loadgen",
        "fleetpick-lab",
        "plotters",
        "ab_glyph",
        "dejavu",
        "png",
        "criterion",
    ] {
        assert!(!names.contains(lab), "the shipped crate depends on {lab}");
    }
}

#[test]
fn no_crate_has_an_import_cycle_among_its_modules() {
    let root = fleetpick_envoy::repo_root();
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path().join("src"))
        .collect();
    crates.push(root.join("tests/src"));
    crates.sort();
    let mut checked = 0;
    let mut cycles = Vec::new();
    for src in crates {
        let graph = module_graph(&src);
        checked += graph.len();
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!("{}: {}", src.display(), cycle.join(" -> ")));
        }
    }
    assert!(checked > 30, "the modules were found ({checked})");
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// A module's path inside its crate (`""` is the crate root).
type Module = String;

/// Which modules each module uses (by `use`, or a path in its code), tests included.
fn module_graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = rust_files(src);
    let modules: BTreeSet<Module> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut v = Uses {
            modules: &modules,
            file_module: module.clone(),
            inline: Vec::new(),
            used: BTreeSet::new(),
        };
        v.visit_file(&file);
        v.used.remove(module);
        graph.insert(module.clone(), v.used);
    }
    graph
}

/// The `.rs` files under `src` and the module each one is (binaries' `main.rs` is a crate of
/// its own and left out).
fn rust_files(src: &Path) -> Vec<(Module, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            match parts.last().map(String::as_str) {
                Some("main") if parts.len() == 1 => continue,
                Some("lib") if parts.len() == 1 => parts.clear(),
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            if path.extension().is_some_and(|e| e == "rs") {
                out.push((parts.join("::"), path));
            }
        }
    }
    out
}

/// Collects the modules a file refers to.
struct Uses<'a> {
    modules: &'a BTreeSet<Module>,
    file_module: Module,
    /// Inline modules (`mod tests { ... }`) the visitor is inside.
    inline: Vec<String>,
    used: BTreeSet<Module>,
}

impl Uses<'_> {
    /// The module a path names, if it starts at `crate`, `super`, `self` or a child module.
    fn resolve(&mut self, segments: &[String]) {
        let mut here: Vec<String> = self
            .file_module
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .chain(self.inline.iter().cloned())
            .collect();
        let mut rest = segments;
        let mut anchored = false;
        while let Some((first, tail)) = rest.split_first() {
            match first.as_str() {
                "crate" => here.clear(),
                "super" => {
                    here.pop();
                }
                "self" => {}
                _ => break,
            }
            anchored = true;
            rest = tail;
        }
        let mut path = here;
        if !anchored {
            // A bare path names a module only when it starts with a child of this one.
            let child = [path.clone(), vec![rest[0].clone()]].concat().join("::");
            if !self.modules.contains(&child) {
                return;
            }
        }
        // The longest prefix that is a module (a file of the crate).
        let mut found = path.join("::");
        for seg in rest {
            path.push(seg.clone());
            let candidate = path.join("::");
            if self.modules.contains(&candidate) {
                found = candidate;
            }
        }
        if self.modules.contains(&found) {
            self.used.insert(found);
        }
    }
}

impl<'ast> Visit<'ast> for Uses<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if m.content.is_some() {
            self.inline.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.inline.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut paths = Vec::new();
        flatten(&u.tree, &mut Vec::new(), &mut paths);
        for p in paths {
            if !p.is_empty() {
                self.resolve(&p);
            }
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.resolve(&segments);
        }
        syn::visit::visit_path(self, p);
    }
}

/// Every path a `use` tree names.
fn flatten(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push([prefix.clone(), vec![n.ident.to_string()]].concat()),
        syn::UseTree::Rename(r) => out.push([prefix.clone(), vec![r.ident.to_string()]].concat()),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten(t, prefix, out);
            }
        }
    }
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<String>> {
    fn visit(
        m: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        path: &mut Vec<Module>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| name(s)).collect();
            cycle.push(name(m));
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.clone());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.clone());
        None
    }
    fn name(m: &str) -> String {
        if m.is_empty() {
            "crate".into()
        } else {
            m.into()
        }
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<Module, BTreeSet<Module>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph).unwrap(),
        ["a", "b", "c", "a"].map(String::from)
    );
    let acyclic: BTreeMap<Module, BTreeSet<Module>> = [("a", vec!["b"]), ("b", vec![])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
        .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
