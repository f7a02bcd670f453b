//! Where a field is in a YAML text: field paths as messages name them
//! (`pools[0].endpoints.us-west`), and their line and column, found in saphyr's node tree, which
//! keeps every node's source position in block and flow style alike.
//!
//! serde reads the data (`serde_norway`); this tree only answers "where". The fleet file's is
//! built when an error needs a position, so a file that loads costs nothing here; a manifest
//! file's once per read, for the lines its objects keep.

use std::fmt;

use saphyr::{MarkedYaml, YamlData, YamlLoader};

/// A step of a field path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A field's path from the document's root, shown as messages name it:
/// `pools[0].endpoints.us-west`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldPath(Vec<Seg>);

impl FieldPath {
    /// A top-level field.
    pub(crate) fn top(key: &str) -> FieldPath {
        FieldPath(vec![Seg::Key(key.to_string())])
    }

    /// The field `key` of this one.
    pub(crate) fn key(&self, key: &str) -> FieldPath {
        self.with(Seg::Key(key.to_string()))
    }

    /// Item `i` of this list.
    pub(crate) fn index(&self, i: usize) -> FieldPath {
        self.with(Seg::Index(i))
    }

    fn with(&self, seg: Seg) -> FieldPath {
        let mut v = self.0.clone();
        v.push(seg);
        FieldPath(v)
    }
}

impl std::ops::Deref for FieldPath {
    type Target = [Seg];

    fn deref(&self) -> &[Seg] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// A place in a file, both counted from 1 (the column in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The documents of a YAML text as nodes with positions.
pub(crate) struct Tree<'a> {
    docs: Vec<MarkedYaml<'a>>,
}

impl<'a> Tree<'a> {
    /// Reads `text`. A text saphyr cannot read has no positions, rather than wrong ones (one
    /// that serde cannot read either has serde's error, which names its own line).
    pub(crate) fn parse(text: &'a str) -> Tree<'a> {
        let mut loader = YamlLoader::<MarkedYaml<'a>>::default();
        // Keys as written, which is how serde reads them into strings (`1`, `true`, `"a"`).
        loader.early_parse(false);
        // Duplicates are serde's to refuse; a position is wanted whatever else is wrong.
        loader.allow_duplicate_keys(true);
        let mut parser = saphyr_parser::Parser::new_from_str(text);
        let docs = match parser.load(&mut loader, true) {
            Ok(()) if loader.error().is_none() => loader.into_documents(),
            _ => Vec::new(),
        };
        Tree { docs }
    }

    /// Where `path` is in document `doc` (from 0): the key for a key step, the item for an
    /// index. When the path leaves the file (a default that is not written), the deepest step
    /// that is there; `None` when not even the first is.
    pub(crate) fn locate(&self, doc: usize, path: &[Seg]) -> Option<Position> {
        let mut node = self.docs.get(doc)?;
        let mut found = None;
        for seg in path {
            let child = match (seg, &untagged(node).data) {
                (Seg::Key(k), YamlData::Mapping(m)) => m
                    .iter()
                    .find(|(key, _)| scalar_text(key) == Some(k.as_str())),
                (Seg::Index(i), YamlData::Sequence(s)) => s.get(*i).map(|item| (item, item)),
                _ => None,
            };
            let Some((at, next)) = child else {
                break;
            };
            found = Some(position_of(at));
            node = next;
        }
        found
    }

    /// Where document `doc` (from 0) starts.
    pub(crate) fn document_start(&self, doc: usize) -> Option<Position> {
        self.docs.get(doc).map(position_of)
    }
}

/// Where `path` is in the first document of `text` (see [`Tree::locate`]).
pub(crate) fn locate(text: &str, path: &[Seg]) -> Option<Position> {
    Tree::parse(text).locate(0, path)
}

fn untagged<'n, 'a>(node: &'n MarkedYaml<'a>) -> &'n MarkedYaml<'a> {
    match &node.data {
        YamlData::Tagged(_, inner) => untagged(inner),
        _ => node,
    }
}

fn scalar_text<'n>(node: &'n MarkedYaml<'_>) -> Option<&'n str> {
    match &untagged(node).data {
        YamlData::Representation(text, _, _) => Some(text),
        _ => None,
    }
}

fn position_of(node: &MarkedYaml<'_>) -> Position {
    let start = node.span.start;
    Position {
        line: start.line(),
        column: start.col() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Seg {
        Seg::Key(k.to_string())
    }

    fn line(text: &str, path: &[Seg]) -> Option<usize> {
        locate(text, path).map(|p| p.line)
    }

    fn at(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
        locate(text, path).map(|p| (p.line, p.column))
    }

    #[test]
    fn paths_read_as_messages_name_them() {
        let p = FieldPath::top("pools")
            .index(0)
            .key("endpoints")
            .key("us-west");
        assert_eq!(p.to_string(), "pools[0].endpoints.us-west");
        assert_eq!(FieldPath::top("a").index(2).index(3).to_string(), "a[2][3]");
    }

    #[test]
    fn locate_handles_list_items() {
        let text = "a:\n  - name: x\n    v: 1\n  - name: y\n    v: 2\nb: 3\n";
        let path = [key("a"), Seg::Index(1), key("v")];
        assert_eq!(line(text, &path), Some(5));
        assert_eq!(line(text, &[key("a"), Seg::Index(0), key("name")]), Some(2));
        assert_eq!(line(text, &[key("b")]), Some(6));
        assert_eq!(line(text, &[key("zz")]), None);
        // Flow style: the field's own line (and column).
        assert_eq!(
            line("s:\n  w: {a: -1}\n", &[key("s"), key("w"), key("a")]),
            Some(2)
        );
        // Only direct children match: a deeper `name` comes first here.
        let text = "c:\n  - labels:\n      name: y\n    name: a\n";
        assert_eq!(line(text, &[key("c"), Seg::Index(0), key("name")]), Some(4));
    }

    #[test]
    fn flow_style_fields_have_their_own_line_and_column() {
        assert_eq!(
            at("s:\n  w: {a: -1}\n", &[key("s"), key("w"), key("a")]),
            Some((2, 7))
        );
        // Maps in lists in maps, all on one line.
        let text =
            "x: 1\nimports: [{pool: x, policy: {queue_threshold: 2, capacity_scaler: 5000}}]\n";
        let path = [
            key("imports"),
            Seg::Index(0),
            key("policy"),
            key("capacity_scaler"),
        ];
        assert_eq!(at(text, &path), Some((2, 50)));
        assert_eq!(at(text, &path[..2]), Some((2, 11)));
        // A flow collection over several lines, inside block style.
        let text =
            "pools:\n  - name: p\n    endpoints: {a: [10.0.0.1,\n      10.0.0.2], \"b-c\": [x]}\n";
        let path = [key("pools"), Seg::Index(0), key("endpoints")];
        assert_eq!(
            at(
                text,
                &[path.to_vec(), vec![key("a"), Seg::Index(1)]].concat()
            ),
            Some((4, 7))
        );
        // Quoted keys are found by their text.
        assert_eq!(
            at(text, &[path.to_vec(), vec![key("b-c")]].concat()),
            Some((4, 18))
        );
    }

    #[test]
    fn a_path_that_leaves_the_file_ends_at_its_deepest_step() {
        let text = "flow_control: {enabled: true}\npoller:\n  interval_ms: 5\n";
        assert_eq!(
            at(text, &[key("flow_control"), key("ttl_ms")]),
            Some((1, 1))
        );
        assert_eq!(
            at(text, &[key("poller"), key("interval_ms"), key("x")]),
            Some((3, 3))
        );
        // An index past the end, or a key where a list is: the enclosing field.
        assert_eq!(at("a: [1]\n", &[key("a"), Seg::Index(3)]), Some((1, 1)));
        assert_eq!(at("a: [1]\n", &[key("a"), key("b")]), Some((1, 1)));
    }

    #[test]
    fn documents_tags_and_unreadable_text() {
        let tree = Tree::parse("a: 1\n---\nkind: x\nspec: !!map {ports: [1, 2]}\n");
        assert_eq!(
            tree.locate(1, &[key("spec"), key("ports"), Seg::Index(1)])
                .map(|p| p.line),
            Some(4)
        );
        assert_eq!(tree.document_start(1).map(|p| p.line), Some(3));
        assert_eq!(tree.locate(2, &[key("a")]), None);
        // Not YAML saphyr reads: no position rather than a wrong one.
        assert_eq!(locate("a: [1\n", &[key("a")]), None);
    }
}
