//! The OpenAI-compatible wire format: request bodies and the error shape.
//!
//! This module owns everything fleetpick knows about OpenAI-style JSON, so the simulator that
//! serves requests and the picker that routes them read bodies the same way:
//! - [`Api`]: which endpoint a path names (`/v1/completions`, `/v1/chat/completions`,
//!   `/v1/embeddings`, `/v1/responses`);
//! - [`InferenceRequest::parse`]: one parse of a body into the model, the prompt text(s) and the
//!   generation options, with errors that name the offending field;
//! - [`ApiError`]: the `{"error":{"message","type","param","code"}}` shape every HTTP client of
//!   an OpenAI server understands.
//!
//! Chat messages are rendered into one prompt text with role markers (a stand-in for a chat
//! template) so that the same conversation always yields the same text, and a shared system
//! prompt yields a shared prefix.

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

impl Prompt {
    /// The bytes that identify this prompt for prefix hashing: the text itself, or the token ids
    /// in little-endian order.
    pub fn hash_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Prompt::Text(text) => std::borrow::Cow::Borrowed(text.as_bytes()),
            Prompt::Tokens(ids) => {
                std::borrow::Cow::Owned(ids.iter().flat_map(|id| id.to_le_bytes()).collect())
            }
        }
    }
}

/// What fleetpick needs from one request body, read in a single parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    pub api: Api,
    pub model: String,
    /// One entry per sequence to generate: a completions request may carry a batch of prompts;
    /// every other API carries exactly one.
    pub prompts: Vec<Prompt>,
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
        let prompts = match api {
            Api::Completions => completion_prompts(take(&mut obj, "prompt")?, "prompt")?,
            Api::Embeddings => completion_prompts(take(&mut obj, "input")?, "input")?,
            Api::ChatCompletions => vec![Prompt::Text(render_messages(
                take(&mut obj, "messages")?,
                "messages",
            )?)],
            Api::Responses => vec![responses_prompt(&mut obj)?],
        };
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
        let cache_salt = match obj.remove("cache_salt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(ApiError::invalid("cache_salt", "must be a string")),
        };
        Ok(InferenceRequest {
            api,
            model,
            prompts,
            stream,
            include_usage,
            max_tokens,
            cache_salt,
        })
    }
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

/// Renders chat messages into one prompt text: `<|role|>\ncontent\n` per message, then the
/// assistant marker, as a chat template would. Content may be a string or a list of content
/// parts, whose text parts are joined; non-text parts (images, audio) contribute a marker.
fn render_messages(value: Value, field: &'static str) -> Result<String, ApiError> {
    let Value::Array(messages) = value else {
        return Err(ApiError::invalid(field, "must be a list of messages"));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    let mut text = String::new();
    for message in &messages {
        let Value::Object(message) = message else {
            return Err(ApiError::invalid(field, "each message must be an object"));
        };
        let role = match message.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(ApiError::invalid(
                    field,
                    "each message needs a string `role`",
                ));
            }
        };
        text.push_str("<|");
        text.push_str(role);
        text.push_str("|>\n");
        append_content(&mut text, message.get("content"), field)?;
        text.push('\n');
    }
    text.push_str("<|assistant|>\n");
    Ok(text)
}

fn append_content(
    text: &mut String,
    content: Option<&Value>,
    field: &'static str,
) -> Result<(), ApiError> {
    match content {
        // An assistant message with only tool calls has no content.
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) => {
            text.push_str(s);
            Ok(())
        }
        Some(Value::Array(parts)) => {
            for part in parts {
                match part {
                    Value::String(s) => text.push_str(s),
                    Value::Object(p) => match p.get("text") {
                        Some(Value::String(s)) => text.push_str(s),
                        _ => {
                            let kind = p.get("type").and_then(Value::as_str).unwrap_or("part");
                            text.push_str("<|");
                            text.push_str(kind);
                            text.push_str("|>");
                        }
                    },
                    _ => {
                        return Err(ApiError::invalid(field, "content parts must be objects"));
                    }
                }
            }
            Ok(())
        }
        Some(_) => Err(ApiError::invalid(
            field,
            "message content must be a string or a list of content parts",
        )),
    }
}

/// `/v1/responses`: `instructions` (a system prompt) then `input`, a string or a list of items
/// shaped like chat messages.
fn responses_prompt(obj: &mut Map<String, Value>) -> Result<Prompt, ApiError> {
    let mut text = String::new();
    match obj.remove("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            text.push_str("<|system|>\n");
            text.push_str(&s);
            text.push('\n');
        }
        Some(_) => return Err(ApiError::invalid("instructions", "must be a string")),
    }
    match take(obj, "input")? {
        Value::String(s) => {
            text.push_str("<|user|>\n");
            text.push_str(&s);
            text.push_str("\n<|assistant|>\n");
        }
        items @ Value::Array(_) => text.push_str(&render_messages(items, "input")?),
        _ => {
            return Err(ApiError::invalid(
                "input",
                "must be a string or a list of items",
            ));
        }
    }
    Ok(Prompt::Text(text))
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
        assert_eq!(r.prompts, vec![Prompt::Text("hi".into())]);
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.stream && r.include_usage);
        let r = parse(Api::Completions, r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        let r = parse(Api::Completions, r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Tokens(vec![1, 2, 3])]);
        let r = parse(Api::Completions, r#"{"model":"m","prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
    }

    #[test]
    fn chat_renders_roles_and_content_parts() {
        let r = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]}],"max_completion_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompts,
            vec![Prompt::Text(
                "<|system|>\nbe brief\n<|user|>\nhello<|image_url|>\n<|assistant|>\n".into()
            )]
        );
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
            r.prompts,
            vec![Prompt::Text(
                "<|system|>\nsys\n<|user|>\nq\n<|assistant|>\n".into()
            )]
        );
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
