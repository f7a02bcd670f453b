//! Where a field is in the fleet file.

/// A step of a field path: a mapping key or a list index.
#[derive(Debug, Clone)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

pub(crate) fn render_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Finds the 1-based line of a field path in block-style YAML: enough to point a person at the
/// right place. Flow style (`{a: 1}`) finds the enclosing line or nothing.
pub(crate) fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    // Each line as (line number, indent of its content, content), with a list item's `- `
    // counted as indentation so that `- name: x` reads as the key `name` one level in.
    let lines: Vec<(usize, usize, &str, bool)> = text
        .lines()
        .enumerate()
        .filter_map(|(n, l)| {
            let content = l.trim_start();
            if content.is_empty() || content.starts_with('#') {
                return None;
            }
            let indent = l.len() - content.len();
            match content.strip_prefix("- ") {
                Some(rest) => Some((n + 1, indent + 2, rest.trim_start(), true)),
                None => Some((n + 1, indent, content, false)),
            }
        })
        .collect();
    let (mut lo, mut hi) = (0usize, lines.len());
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for seg in path {
        let inside = |i: usize| parent_indent.is_none_or(|p| lines[i].1 > p);
        // Direct children sit at the indent of the first line inside the block.
        let child_indent = (lo..hi).find(|&i| inside(i)).map(|i| lines[i].1);
        let hit = match seg {
            Seg::Key(k) => (lo..hi).find(|&i| {
                Some(lines[i].1) == child_indent && {
                    let c = lines[i].2;
                    let c = c.strip_prefix('"').unwrap_or(c);
                    c.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with("\":"))
                }
            }),
            Seg::Index(n) => {
                let items: Vec<usize> = (lo..hi).filter(|&i| inside(i) && lines[i].3).collect();
                let first_indent = items.first().map(|&i| lines[i].1);
                items
                    .into_iter()
                    .filter(|&i| Some(lines[i].1) == first_indent)
                    .nth(*n)
            }
        };
        // Not found below here (flow style, say): the enclosing line is the best answer.
        let Some(hit) = hit else {
            break;
        };
        let indent = lines[hit].1;
        let is_item = matches!(seg, Seg::Index(_));
        // The block of this node: following lines indented deeper (for a list item, lines at
        // the item's content indent belong to it too).
        let end = (hit + 1..hi)
            .find(|&i| {
                if is_item {
                    lines[i].1 < indent || (lines[i].1 == indent && lines[i].3)
                } else {
                    lines[i].1 <= indent
                }
            })
            .unwrap_or(hi);
        found = Some(lines[hit].0);
        if is_item {
            // Keys of the item sit at `indent`; the first may be on the item's own line.
            lo = hit;
            parent_indent = indent.checked_sub(1);
        } else {
            lo = hit + 1;
            parent_indent = Some(indent);
        }
        hi = end;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Seg {
        Seg::Key(k.to_string())
    }

    #[test]
    fn locate_handles_list_items() {
        let text = "a:\n  - name: x\n    v: 1\n  - name: y\n    v: 2\nb: 3\n";
        let path = [key("a"), Seg::Index(1), key("v")];
        assert_eq!(locate(text, &path), Some(5));
        assert_eq!(
            locate(text, &[key("a"), Seg::Index(0), key("name")]),
            Some(2)
        );
        assert_eq!(locate(text, &[key("b")]), Some(6));
        assert_eq!(locate(text, &[key("zz")]), None);
        // Flow style: the enclosing line.
        assert_eq!(
            locate("s:\n  w: {a: -1}\n", &[key("s"), key("w"), key("a")]),
            Some(2)
        );
        // Only direct children match: a deeper `name` comes first here.
        let text = "c:\n  - labels:\n      name: y\n    name: a\n";
        assert_eq!(
            locate(text, &[key("c"), Seg::Index(0), key("name")]),
            Some(4)
        );
    }
}
