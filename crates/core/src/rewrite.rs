//! Model rewrites: the table of client-facing names served as other models, and the restoring
//! of the client's name in responses.
//!
//! A request for a rewritten name is sent to one of its targets, drawn by weight per request
//! (canary and A/B rollouts); its body's `model` says the target, and the picker schedules it
//! as the target (pool, LoRA affinity, prefix). The response, streamed through fleetpick, gets
//! the client's name back wherever its top-level `model` names the target: in a JSON body
//! (held whole until its end, up to [`MAX_HELD`]) and in every `data:` line of an event stream
//! (held only to the end of each line).

use std::collections::HashMap;

use fleetpick_config::RewriteSpec;
use fleetpick_protocol::openai::replace_model;

#[derive(Debug, Default)]
pub struct Rewrites {
    by_model: HashMap<String, Targets>,
}

#[derive(Debug)]
struct Targets {
    /// (target, cumulative weight): drawn with one random number and a scan.
    cumulative: Vec<(String, u32)>,
    total: u32,
}

impl Rewrites {
    pub fn new(specs: &[RewriteSpec]) -> Rewrites {
        let by_model = specs
            .iter()
            .map(|r| {
                let mut total = 0u32;
                let cumulative = r
                    .targets
                    .iter()
                    .filter(|t| t.weight > 0)
                    .map(|t| {
                        total = total.saturating_add(t.weight);
                        (t.model.clone(), total)
                    })
                    .collect();
                (r.model.clone(), Targets { cumulative, total })
            })
            .collect();
        Rewrites { by_model }
    }

    /// The model to serve a request for `model` with: `None` when `model` is not rewritten.
    pub fn target(&self, model: &str, rng: &mut fastrand::Rng) -> Option<&str> {
        let t = self.by_model.get(model)?;
        if t.total == 0 {
            return None;
        }
        let draw = rng.u32(..t.total);
        t.cumulative
            .iter()
            .find(|(_, upto)| draw < *upto)
            .map(|(m, _)| m.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    /// Every (client-facing name, target) a request may be served as.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_model.iter().flat_map(|(model, t)| {
            t.cumulative
                .iter()
                .map(move |(target, _)| (model.as_str(), target.as_str()))
        })
    }
}

/// Largest JSON response body held to restore the model name; a larger one passes unchanged
/// (completions this large are far beyond any real response; holding it would cost memory).
pub const MAX_HELD: usize = 16 * 1024 * 1024;

/// How a response's body is carried, from its `content-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Json,
    EventStream,
    /// Anything else (errors in plain text, say): passed as it is.
    Other,
}

/// Restores the client's model name in one response, chunk by chunk.
#[derive(Debug)]
pub struct Restorer {
    client: String,
    target: String,
    shape: Shape,
    held: Vec<u8>,
}

impl Restorer {
    pub fn new(client: &str, target: &str) -> Restorer {
        Restorer {
            client: client.to_string(),
            target: target.to_string(),
            shape: Shape::Json,
            held: Vec::new(),
        }
    }

    /// Notes the response's `content-type` and `content-encoding` (a compressed body is
    /// passed as it is: its bytes are not JSON).
    pub fn content_type(&mut self, content_type: Option<&str>, content_encoding: Option<&str>) {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let compressed = content_encoding.is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        self.shape = if compressed {
            Shape::Other
        } else if ct.starts_with("text/event-stream") {
            Shape::EventStream
        } else if ct.starts_with("application/json") || ct.is_empty() {
            Shape::Json
        } else {
            Shape::Other
        };
    }

    /// Takes the next chunk of the response body and returns what can be sent on now (all of
    /// what was held, at the end).
    pub fn push(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        match self.shape {
            Shape::Other => {
                let mut out = std::mem::take(&mut self.held);
                out.extend_from_slice(chunk);
                out
            }
            Shape::Json => {
                self.held.extend_from_slice(chunk);
                if self.held.len() > MAX_HELD {
                    tracing::warn!(
                        bytes = self.held.len(),
                        "response too large to restore the model name in; passed unchanged"
                    );
                    self.shape = Shape::Other;
                    return std::mem::take(&mut self.held);
                }
                if !end {
                    return Vec::new();
                }
                let body = std::mem::take(&mut self.held);
                replace_model(&body, &self.target, &self.client).unwrap_or(body)
            }
            Shape::EventStream => {
                self.held.extend_from_slice(chunk);
                if self.held.len() > MAX_HELD {
                    tracing::warn!(
                        bytes = self.held.len(),
                        "event line too long to restore the model name in; passed unchanged"
                    );
                    self.shape = Shape::Other;
                    return std::mem::take(&mut self.held);
                }
                let upto = if end {
                    self.held.len()
                } else {
                    match self.held.iter().rposition(|&b| b == b'\n') {
                        Some(i) => i + 1,
                        None => return Vec::new(),
                    }
                };
                let rest = self.held.split_off(upto);
                let lines = std::mem::replace(&mut self.held, rest);
                let mut out = Vec::with_capacity(lines.len() + 64);
                for line in lines.split_inclusive(|&b| b == b'\n') {
                    out.extend_from_slice(&self.restore_line(line));
                }
                out
            }
        }
    }

    /// One event-stream line: `data: {...}` with the target as its model gets the client's.
    fn restore_line<'a>(&self, line: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let Some(payload) = line.strip_prefix(b"data:") else {
            return line.into();
        };
        let start = line.len() - payload.len();
        match replace_model(payload, &self.target, &self.client) {
            Some(json) => {
                let mut out = line[..start].to_vec();
                out.extend_from_slice(&json);
                out.into()
            }
            None => line.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpick_config::RewriteTarget;

    fn spec(model: &str, targets: &[(&str, u32)]) -> RewriteSpec {
        RewriteSpec {
            model: model.into(),
            targets: targets
                .iter()
                .map(|(m, w)| RewriteTarget {
                    model: (*m).into(),
                    weight: *w,
                })
                .collect(),
        }
    }

    #[test]
    fn targets_are_drawn_by_weight() {
        let r = Rewrites::new(&[spec("chat", &[("a", 3), ("b", 1), ("off", 0)])]);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for _ in 0..4000 {
            *counts
                .entry(r.target("chat", &mut rng).unwrap())
                .or_default() += 1;
        }
        assert_eq!(counts.get("off"), None);
        let a = f64::from(counts["a"]) / 4000.0;
        assert!((0.70..0.80).contains(&a), "share of a: {a}");
        assert_eq!(r.target("other", &mut rng), None);
    }

    #[test]
    fn json_is_restored_at_the_end_whatever_the_chunks() {
        let body =
            br#"{"id":"x","model":"target-model","choices":[{"text":"model target-model"}]}"#;
        for cut in [1, 7, 20, body.len() - 1] {
            let mut r = Restorer::new("chat", "target-model");
            r.content_type(Some("application/json"), None);
            let mut out = r.push(&body[..cut], false);
            assert!(out.is_empty(), "nothing goes out before the end");
            out.extend(r.push(&body[cut..], true));
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["model"], "chat");
            assert_eq!(v["choices"][0]["text"], "model target-model");
        }
    }

    #[test]
    fn events_are_restored_line_by_line_across_chunks() {
        let stream = "data: {\"model\":\"t\",\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"model\":\"t\",\"choices\":[]}\n\ndata: [DONE]\n\n";
        let mut r = Restorer::new("client/name", "t");
        r.content_type(Some("text/event-stream; charset=utf-8"), None);
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(5) {
            out.extend(r.push(piece, false));
        }
        out.extend(r.push(b"", true));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            stream.replace("\"model\":\"t\"", "\"model\":\"client/name\"")
        );
    }

    #[test]
    fn other_bodies_pass_unchanged_and_nothing_is_lost() {
        let mut r = Restorer::new("c", "t");
        r.content_type(Some("text/plain"), None);
        assert_eq!(r.push(b"model t", false), b"model t");
        assert_eq!(r.push(b"!", true), b"!");
        // A JSON body that does not parse is sent as it came.
        let mut r = Restorer::new("c", "t");
        r.content_type(None, None);
        assert!(r.push(b"{\"model\":", false).is_empty());
        assert_eq!(r.push(b"\"t\"", true), b"{\"model\":\"t\"");
        // Compressed: passed through, nothing held.
        let mut r = Restorer::new("c", "t");
        r.content_type(Some("application/json"), Some("gzip"));
        assert_eq!(r.push(b"\x1f\x8b", false), b"\x1f\x8b");
    }
}
