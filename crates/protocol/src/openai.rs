//! The OpenAI-compatible wire format: request bodies and the error shape.
//!
//! This module owns everything fleetpick knows about OpenAI-style JSON, so the simulator that
//! serves requests and the picker that routes them read bodies the same way:
//! - [`Api`]: which endpoint a path names (`/v1/completions`, `/v1/chat/completions`,
//!   `/v1/embeddings`, `/v1/responses`);
//! - [`InferenceRequest::parse`]: one parse of a body into the model, the [`Input`] (prompts, or
//!   a conversation of messages) and the generation options, with errors that name the
//!   offending field;
//! - [`ApiError`]: the `{"error":{"message","type","param","code"}}` shape every HTTP client of
//!   an OpenAI server understands.
//!
//! The parse keeps the input's structure and renders nothing: how a conversation becomes one
//! prompt (a chat template, or the picker's text for prefix hashing) belongs to whoever reads
//! it. Strings are moved out of the parsed JSON, not copied.

use serde::Serialize;
use serde_json::{Map, Value};

/// The OpenAI endpoints fleetpick understands, told apart by path suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    ChatCompletions,
    Embeddings,
    Responses,
}

impl Api {
    /// The API a request path names; the query string is ignored. Suffix matching lets gateways
    /// mount the API under a prefix (`/llama/v1/completions`).
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.split('?').next().unwrap_or(path);
        let path = path.trim_end_matches('/');
        if path.ends_with("/v1/chat/completions") {
            Some(Api::ChatCompletions)
        } else if path.ends_with("/v1/completions") {
            Some(Api::Completions)
        } else if path.ends_with("/v1/embeddings") {
            Some(Api::Embeddings)
        } else if path.ends_with("/v1/responses") {
            Some(Api::Responses)
        } else {
            None
        }
    }
}

/// A prompt as the model sees it: text, or token ids sent by a client that tokenized itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// What the model is asked to continue, as the body gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// `prompt` (completions) or `input` (embeddings): prompts taken as they are, one sequence
    /// each (a completions request may carry a batch).
    Prompts(Vec<Prompt>),
    /// `messages` (chat completions), or `instructions` and `input` (responses): one
    /// conversation, one sequence. A string `input` is one user message.
    Conversation {
        /// `/v1/responses` `instructions`: a system prompt given beside the messages.
        instructions: Option<String>,
        messages: Vec<Message>,
    },
}

impl Input {
    /// Sequences to generate: one per prompt, one for a conversation.
    pub fn sequences(&self) -> usize {
        match self {
            Input::Prompts(prompts) => prompts.len(),
            Input::Conversation { .. } => 1,
        }
    }
}

/// One chat message (or `/v1/responses` input item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    /// The content: none (an assistant turn of tool calls only), one text part for a string, or
    /// the list of content parts in order.
    pub parts: Vec<Part>,
}

/// One content part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// A part with no `text` (an image, audio, a file): its `type`, or `part` if it has none.
    /// Its payload is not kept.
    Other(String),
}

/// What fleetpick needs from one request body, read in a single parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    pub api: Api,
    pub model: String,
    pub input: Input,
    pub stream: bool,
    /// `stream_options.include_usage`: send a final usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// `max_tokens`, or `max_completion_tokens` / `max_output_tokens` where the API names it so.
    pub max_tokens: Option<u32>,
    /// vLLM's `cache_salt`: requests with different salts never share prefix-cache blocks.
    pub cache_salt: Option<String>,
}

impl InferenceRequest {
    /// Parses a request body for `api`. Every error names the field at fault.
    pub fn parse(api: Api, body: &[u8]) -> Result<InferenceRequest, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(ApiError::bad_request("request body must be a JSON object"));
        };
        let model = match obj.remove("model") {
            Some(Value::String(m)) if !m.is_empty() => m,
            Some(Value::String(_)) => return Err(ApiError::missing("model")),
            None | Some(Value::Null) => return Err(ApiError::missing("model")),
            Some(_) => return Err(ApiError::invalid("model", "must be a string")),
        };
        let input = match api {
            Api::Completions => {
                Input::Prompts(completion_prompts(take(&mut obj, "prompt")?, "prompt")?)
            }
            Api::Embeddings => {
                Input::Prompts(completion_prompts(take(&mut obj, "input")?, "input")?)
            }
            Api::ChatCompletions => Input::Conversation {
                instructions: None,
                messages: messages(take(&mut obj, "messages")?, "messages")?,
            },
            Api::Responses => responses_input(&mut obj)?,
        };
        let (stream, include_usage) = stream_options(&obj)?;
        let max_tokens = max_tokens(&obj)?;
        let cache_salt = match obj.remove("cache_salt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(ApiError::invalid("cache_salt", "must be a string")),
        };
        Ok(InferenceRequest {
            api,
            model,
            input,
            stream,
            include_usage,
            max_tokens,
            cache_salt,
        })
    }
}

/// `stream` and `stream_options.include_usage`.
fn stream_options(obj: &Map<String, Value>) -> Result<(bool, bool), ApiError> {
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "must be a boolean")),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(opts)) => match opts.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stream_options.include_usage",
                    "must be a boolean",
                ));
            }
        },
        Some(_) => return Err(ApiError::invalid("stream_options", "must be an object")),
    };
    Ok((stream, include_usage))
}

/// `max_tokens`, `max_completion_tokens` or `max_output_tokens`: the last one given wins, and
/// each given must be a positive integer.
fn max_tokens(obj: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    let mut max_tokens = None;
    for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n >= 1 => max_tokens = Some(n),
                _ => return Err(ApiError::invalid(field, "must be a positive integer")),
            },
        }
    }
    Ok(max_tokens)
}

/// Writes `to` as the top-level `model` of a JSON object, in place of `from`: the rest of the
/// bytes are kept as they are (one scan that builds nothing, no re-serialization), so a large
/// prompt costs a pass, not a second parse. `None` when the text is not a JSON object whose
/// `model` is the string `from`.
pub fn replace_model(json: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        model: Option<&'a serde_json::value::RawValue>,
    }
    let probe: Probe<'_> = serde_json::from_slice(json).ok()?;
    let raw = probe.model?.get();
    if serde_json::from_str::<&str>(raw).ok() != Some(from)
        && serde_json::from_str::<String>(raw).ok().as_deref() != Some(from)
    {
        return None;
    }
    // The raw value borrows from `json`: its offset there is where the old name starts.
    let start = (raw.as_ptr() as usize).checked_sub(json.as_ptr() as usize)?;
    let end = start + raw.len();
    if json.get(start..end) != Some(raw.as_bytes()) {
        return None;
    }
    let to = serde_json::to_string(to).ok()?;
    let mut out = Vec::with_capacity(json.len() + to.len());
    out.extend_from_slice(&json[..start]);
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&json[end..]);
    Some(out)
}

fn take(obj: &mut Map<String, Value>, field: &'static str) -> Result<Value, ApiError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Err(ApiError::missing(field)),
        Some(v) => Ok(v),
    }
}

/// `prompt` (completions) or `input` (embeddings): a string, a list of strings, a list of token
/// ids, or a list of token-id lists.
fn completion_prompts(value: Value, field: &'static str) -> Result<Vec<Prompt>, ApiError> {
    const SHAPE: &str =
        "must be a string, a list of strings, a list of token ids or a list of token-id lists";
    match value {
        Value::String(s) => Ok(vec![Prompt::Text(s)]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid(field, "must not be empty"))
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(Prompt::Text(s)),
                    _ => Err(ApiError::invalid(field, SHAPE)),
                })
                .collect(),
            Value::Number(_) => Ok(vec![Prompt::Tokens(token_ids(&items, field)?)]),
            Value::Array(_) => items
                .iter()
                .map(|item| match item {
                    Value::Array(ids) if !ids.is_empty() => {
                        Ok(Prompt::Tokens(token_ids(ids, field)?))
                    }
                    _ => Err(ApiError::invalid(field, SHAPE)),
                })
                .collect(),
            _ => Err(ApiError::invalid(field, SHAPE)),
        },
        _ => Err(ApiError::invalid(field, SHAPE)),
    }
}

fn token_ids(items: &[Value], field: &'static str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ApiError::invalid(field, "token ids must be non-negative integers"))
        })
        .collect()
}

/// Chat `messages` (or `/v1/responses` `input` items): a non-empty list of messages, each with
/// a string `role` and a content that is absent, a string, or a list of content parts.
fn messages(value: Value, field: &'static str) -> Result<Vec<Message>, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid(field, "must be a list of messages"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    items.into_iter().map(|item| message(item, field)).collect()
}

fn message(value: Value, field: &'static str) -> Result<Message, ApiError> {
    let Value::Object(mut message) = value else {
        return Err(ApiError::invalid(field, "each message must be an object"));
    };
    let role = match message.remove("role") {
        Some(Value::String(r)) => r,
        _ => {
            return Err(ApiError::invalid(
                field,
                "each message needs a string `role`",
            ));
        }
    };
    let parts = match message.remove("content") {
        // An assistant message with only tool calls has no content.
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![Part::Text(s)],
        Some(Value::Array(parts)) => parts
            .into_iter()
            .map(|part| content_part(part, field))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                field,
                "message content must be a string or a list of content parts",
            ));
        }
    };
    Ok(Message { role, parts })
}

/// A content part: a string, or an object whose string `text` makes it a text part (any other
/// object is a non-text part, named by its `type`).
fn content_part(part: Value, field: &'static str) -> Result<Part, ApiError> {
    match part {
        Value::String(s) => Ok(Part::Text(s)),
        Value::Object(mut p) => match p.remove("text") {
            Some(Value::String(s)) => Ok(Part::Text(s)),
            _ => Ok(Part::Other(match p.remove("type") {
                Some(Value::String(kind)) => kind,
                _ => "part".to_string(),
            })),
        },
        _ => Err(ApiError::invalid(field, "content parts must be objects")),
    }
}

/// `/v1/responses`: `instructions` (a system prompt) and `input`, a string (one user message) or
/// a list of items shaped like chat messages.
fn responses_input(obj: &mut Map<String, Value>) -> Result<Input, ApiError> {
    let instructions = match obj.remove("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::invalid("instructions", "must be a string")),
    };
    let messages = match take(obj, "input")? {
        Value::String(s) => vec![Message {
            role: "user".to_string(),
            parts: vec![Part::Text(s)],
        }],
        items @ Value::Array(_) => messages(items, "input")?,
        _ => {
            return Err(ApiError::invalid(
                "input",
                "must be a string or a list of items",
            ));
        }
    };
    Ok(Input::Conversation {
        instructions,
        messages,
    })
}

/// An error in the OpenAI shape, with the HTTP status it travels under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", message)
    }

    /// A required field is absent (or null).
    pub fn missing(field: &'static str) -> ApiError {
        ApiError {
            param: Some(field),
            ..ApiError::bad_request(format!("`{field}` is required"))
        }
    }

    /// A field is present but not acceptable.
    pub fn invalid(field: &'static str, why: &str) -> ApiError {
        ApiError {
            param: Some(field),
            ..ApiError::bad_request(format!("`{field}` {why}"))
        }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model"),
            ..ApiError::new(
                404,
                "not_found_error",
                format!("the model `{model}` does not exist"),
            )
        }
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Vec<u8> {
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.status,
            },
        };
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(api: Api, body: &str) -> Result<InferenceRequest, ApiError> {
        InferenceRequest::parse(api, body.as_bytes())
    }

    #[test]
    fn replace_model_splices_only_the_top_level_model() {
        let body = br#"{"messages":[{"role":"user","content":"model \"a\""}], "model" : "a", "n":{"model":"a"}}"#;
        let out = replace_model(body, "a", "b/c\"d").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "b/c\"d");
        assert_eq!(v["n"]["model"], "a", "nested fields are left alone");
        assert_eq!(v["messages"][0]["content"], "model \"a\"");
        // The bytes around the value are kept as they were.
        assert!(
            out.starts_with(
                br#"{"messages":[{"role":"user","content":"model \"a\""}], "model" : "#
            )
        );
        assert!(out.ends_with(br#", "n":{"model":"a"}}"#));
        // An escaped name still matches.
        assert!(replace_model(br#"{"model":"\u0061"}"#, "a", "b").is_some());
        assert_eq!(replace_model(br#"{"model":"x"}"#, "a", "b"), None);
        assert_eq!(replace_model(br#"{"model":1}"#, "a", "b"), None);
        assert_eq!(replace_model(b"[1]", "a", "b"), None);
        assert_eq!(replace_model(b"not json", "a", "b"), None);
    }

    #[test]
    fn api_from_path_uses_suffix_and_ignores_query() {
        assert_eq!(Api::from_path("/v1/completions"), Some(Api::Completions));
        assert_eq!(
            Api::from_path("/v1/chat/completions?x=1"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(
            Api::from_path("/llama/v1/embeddings"),
            Some(Api::Embeddings)
        );
        assert_eq!(Api::from_path("/v1/responses/"), Some(Api::Responses));
        assert_eq!(Api::from_path("/v1/models"), None);
    }

    #[test]
    fn completions_string_and_batch_and_tokens() {
        let r = parse(Api::Completions, r#"{"model":"m","prompt":"hi","max_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(r.input, Input::Prompts(vec![Prompt::Text("hi".into())]));
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.stream && r.include_usage);
        let r = parse(Api::Completions, r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.input.sequences(), 2);
        let r = parse(Api::Completions, r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.input, Input::Prompts(vec![Prompt::Tokens(vec![1, 2, 3])]));
        let r = parse(Api::Completions, r#"{"model":"m","prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(r.input.sequences(), 2);
    }

    fn text(s: &str) -> Part {
        Part::Text(s.into())
    }

    fn msg(role: &str, parts: Vec<Part>) -> Message {
        Message {
            role: role.into(),
            parts,
        }
    }

    #[test]
    fn chat_keeps_roles_and_content_parts() {
        let r = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]},{"role":"assistant","tool_calls":[]},{"role":"user","content":["s",{"text":5},{}]}],"max_completion_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(
            r.input,
            Input::Conversation {
                instructions: None,
                messages: vec![
                    msg("system", vec![text("be brief")]),
                    msg("user", vec![text("hello"), Part::Other("image_url".into())]),
                    msg("assistant", vec![]),
                    msg(
                        "user",
                        vec![
                            text("s"),
                            Part::Other("part".into()),
                            Part::Other("part".into())
                        ]
                    ),
                ],
            }
        );
        assert_eq!(r.input.sequences(), 1);
        assert_eq!(r.max_tokens, Some(3));
    }

    #[test]
    fn responses_input_and_instructions() {
        let r = parse(
            Api::Responses,
            r#"{"model":"m","instructions":"sys","input":"q"}"#,
        )
        .unwrap();
        assert_eq!(
            r.input,
            Input::Conversation {
                instructions: Some("sys".into()),
                messages: vec![msg("user", vec![text("q")])],
            }
        );
        let r = parse(
            Api::Responses,
            r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"a"}]}],"max_output_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(
            r.input,
            Input::Conversation {
                instructions: None,
                messages: vec![msg("user", vec![text("a")])],
            }
        );
        assert_eq!(r.max_tokens, Some(9));
        let e = parse(
            Api::Responses,
            r#"{"model":"m","instructions":1,"input":"q"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, Some("instructions"));
        let e = parse(Api::Responses, r#"{"model":"m","input":[]}"#).unwrap_err();
        assert_eq!(e.param, Some("input"));
        let e = parse(Api::Responses, r#"{"model":"m","input":3}"#).unwrap_err();
        assert_eq!(e.param, Some("input"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(Api::Completions, "{not json").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse(Api::Completions, r#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("model")));
        let e = parse(Api::Completions, r#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param, Some("prompt"));
        let e = parse(Api::ChatCompletions, r#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));
        let e = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"content":"x"}]}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("role"), "{}", e.message);
        let e = parse(
            Api::Completions,
            r#"{"model":"m","prompt":"x","max_tokens":0}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
        let e = parse(
            Api::Completions,
            r#"{"model":"m","prompt":"x","stream":"yes"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param, Some("stream"));
        let e = parse(Api::Completions, "[1,2]").unwrap_err();
        assert!(e.message.contains("object"));
    }

    #[test]
    fn error_body_has_openai_shape() {
        let body = ApiError::model_not_found("x").body();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], 404);
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("`x`"));
    }
}
