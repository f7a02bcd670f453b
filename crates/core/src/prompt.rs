//! The picker's view of a prompt: the bytes the `prefix` module hashes to find the endpoints that
//! already hold its prefix.
//!
//! The picker does not know the model's chat template or tokenizer, and does not need to: it
//! only needs the same conversation to give the same bytes, and a shared beginning (a system
//! prompt) to give shared leading bytes. A conversation is rendered as `<|role|>\n` then the
//! content then `\n` per message (`/v1/responses` `instructions` as a system message first),
//! then `<|assistant|>\n`; a content part with no text contributes `<|type|>`. A text prompt is
//! its own bytes; a token-id prompt is its ids in little-endian order.

use std::borrow::Cow;

use fleetpick_protocol::openai::{Input, Message, Part, Prompt};

/// The bytes of the request's first sequence (the one the prefix index follows), or `None` when
/// there is none.
pub fn prefix_bytes(input: &Input) -> Option<Cow<'_, [u8]>> {
    match input {
        Input::Prompts(prompts) => prompts.first().map(prompt_bytes),
        Input::Conversation {
            instructions,
            messages,
        } => Some(Cow::Owned(
            render_conversation(instructions.as_deref(), messages).into_bytes(),
        )),
    }
}

/// A prompt's bytes: the text itself, or the token ids in little-endian order.
pub fn prompt_bytes(prompt: &Prompt) -> Cow<'_, [u8]> {
    match prompt {
        Prompt::Text(text) => Cow::Borrowed(text.as_bytes()),
        Prompt::Tokens(ids) => Cow::Owned(ids.iter().flat_map(|id| id.to_le_bytes()).collect()),
    }
}

/// A conversation as one text with role markers (see the module's documentation).
pub fn render_conversation(instructions: Option<&str>, messages: &[Message]) -> String {
    // Sized once: a long system prompt is copied once, not regrown.
    let len: usize = instructions.map_or(0, str::len)
        + messages
            .iter()
            .map(|m| m.role.len() + m.parts.iter().map(part_len).sum::<usize>() + 8)
            .sum::<usize>();
    let mut text = String::with_capacity(len + 32);
    if let Some(system) = instructions {
        push_role(&mut text, "system");
        text.push_str(system);
        text.push('\n');
    }
    for message in messages {
        push_role(&mut text, &message.role);
        for part in &message.parts {
            match part {
                Part::Text(s) => text.push_str(s),
                Part::Other(kind) => {
                    text.push_str("<|");
                    text.push_str(kind);
                    text.push_str("|>");
                }
            }
        }
        text.push('\n');
    }
    push_role(&mut text, "assistant");
    text
}

fn push_role(text: &mut String, role: &str) {
    text.push_str("<|");
    text.push_str(role);
    text.push_str("|>\n");
}

fn part_len(part: &Part) -> usize {
    match part {
        Part::Text(s) => s.len(),
        Part::Other(kind) => kind.len() + 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpick_protocol::openai::{Api, InferenceRequest};

    fn bytes(api: Api, body: &str) -> Vec<u8> {
        let req = InferenceRequest::parse(api, body.as_bytes()).unwrap();
        prefix_bytes(&req.input).unwrap().into_owned()
    }

    // The two renderings below are the bytes the parse itself produced before it became
    // structured: the picker's hashes, and so its placements, are unchanged.
    #[test]
    fn chat_renders_roles_and_content_parts() {
        let b = bytes(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]}],"max_completion_tokens":3}"#,
        );
        assert_eq!(
            b,
            b"<|system|>\nbe brief\n<|user|>\nhello<|image_url|>\n<|assistant|>\n"
        );
    }

    #[test]
    fn responses_input_and_instructions() {
        let b = bytes(
            Api::Responses,
            r#"{"model":"m","instructions":"sys","input":"q"}"#,
        );
        assert_eq!(b, b"<|system|>\nsys\n<|user|>\nq\n<|assistant|>\n");
        let b = bytes(
            Api::Responses,
            r#"{"model":"m","input":[{"role":"user","content":"a"},{"role":"assistant","content":null},{"role":"user","content":["b",{"type":"input_audio"},{}]}]}"#,
        );
        assert_eq!(
            b,
            b"<|user|>\na\n<|assistant|>\n\n<|user|>\nb<|input_audio|><|part|>\n<|assistant|>\n"
        );
    }

    #[test]
    fn prompts_are_their_own_bytes_and_the_first_is_hashed() {
        let b = bytes(Api::Completions, r#"{"model":"m","prompt":["ab","cd"]}"#);
        assert_eq!(b, b"ab");
        let b = bytes(Api::Completions, r#"{"model":"m","prompt":[1,256]}"#);
        assert_eq!(b, [1, 0, 0, 0, 0, 1, 0, 0]);
        let b = bytes(Api::Embeddings, r#"{"model":"m","input":"e"}"#);
        assert_eq!(b, b"e");
    }
}
