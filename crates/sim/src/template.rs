//! The simulator's chat template: a request's input to the token ids its engine sees, one list
//! per sequence, as a real server applies the model's chat template and tokenizer.
//!
//! # The template
//! In the style of Llama 3's, with its own special tokens (ids from [`TEXT_VOCAB`] up, one token
//! each, never produced from text: text that spells a marker is tokenized as plain text):
//!
//! ```text
//! <|begin_of_text|>
//!   per message:  <|start_header_id|> role <|end_header_id|> "\n\n" content <|eot_id|>
//! <|start_header_id|> assistant <|end_header_id|> "\n\n"
//! ```
//!
//! The role, the blank line and each content part are tokenized by [`crate::tokenize`] on their
//! own (so no token spans two of them); a content part with no text (an image, audio) is one
//! [`MEDIA`] placeholder token. A `/v1/responses` `instructions` is a system message before the
//! others. The final assistant header is the generation prompt.
//!
//! Completions prompts are not templated: a text prompt is [`BEGIN_OF_TEXT`] and its tokens; a
//! prompt of token ids is those ids as the client gave them.

use fleetpick_protocol::openai::{Input, Message, Part, Prompt};

use super::tokenize::{TEXT_VOCAB, tokenize_into};

/// `<|begin_of_text|>`: opens every text prompt.
pub const BEGIN_OF_TEXT: u32 = TEXT_VOCAB;
/// `<|start_header_id|>`: opens a message's header.
pub const START_HEADER: u32 = TEXT_VOCAB + 1;
/// `<|end_header_id|>`: closes a message's header.
pub const END_HEADER: u32 = TEXT_VOCAB + 2;
/// `<|eot_id|>`: ends a message.
pub const END_OF_TURN: u32 = TEXT_VOCAB + 3;
/// One non-text content part. The simulator does not see media, so two images look alike to its
/// prefix cache.
pub const MEDIA: u32 = TEXT_VOCAB + 4;

/// The token ids of each sequence of `input`, in order. Token-id prompts are moved, not copied.
pub fn sequences(input: Input) -> Vec<Vec<u32>> {
    match input {
        Input::Prompts(prompts) => prompts
            .into_iter()
            .map(|prompt| match prompt {
                Prompt::Tokens(ids) => ids,
                Prompt::Text(text) => {
                    let mut ids = Vec::with_capacity(text.len() / 4 + 2);
                    ids.push(BEGIN_OF_TEXT);
                    tokenize_into(&text, &mut ids);
                    ids
                }
            })
            .collect(),
        Input::Conversation {
            instructions,
            messages,
        } => vec![conversation(instructions.as_deref(), &messages)],
    }
}

/// A conversation's token ids (see the module's documentation).
pub fn conversation(instructions: Option<&str>, messages: &[Message]) -> Vec<u32> {
    let text_len: usize = instructions.map_or(0, str::len)
        + messages
            .iter()
            .flat_map(|m| &m.parts)
            .map(|p| match p {
                Part::Text(s) => s.len(),
                Part::Other(_) => 0,
            })
            .sum::<usize>();
    // Sized once, at about 4 bytes a token plus the markers.
    let mut ids = Vec::with_capacity(text_len / 4 + 8 * messages.len() + 16);
    ids.push(BEGIN_OF_TEXT);
    if let Some(system) = instructions {
        header(&mut ids, "system");
        tokenize_into(system, &mut ids);
        ids.push(END_OF_TURN);
    }
    for message in messages {
        header(&mut ids, &message.role);
        for part in &message.parts {
            match part {
                Part::Text(text) => tokenize_into(text, &mut ids),
                Part::Other(_) => ids.push(MEDIA),
            }
        }
        ids.push(END_OF_TURN);
    }
    header(&mut ids, "assistant");
    ids
}

/// A message header and the blank line after it.
fn header(ids: &mut Vec<u32>, role: &str) {
    ids.push(START_HEADER);
    tokenize_into(role, ids);
    ids.push(END_HEADER);
    tokenize_into("\n\n", ids);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::{token_id, tokenize};
    use fleetpick_protocol::openai::{Api, InferenceRequest};

    fn parse(api: Api, body: &str) -> Vec<Vec<u32>> {
        sequences(InferenceRequest::parse(api, body.as_bytes()).unwrap().input)
    }

    #[test]
    fn chat_is_framed_like_llama_3() {
        let ids = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        );
        let nl = token_id("\n\n");
        let mut want = vec![
            BEGIN_OF_TEXT,
            START_HEADER,
            token_id("system"),
            END_HEADER,
            nl,
        ];
        want.extend(tokenize("Be brief."));
        want.extend([END_OF_TURN, START_HEADER, token_id("user"), END_HEADER, nl]);
        want.extend([token_id("Hi"), MEDIA, END_OF_TURN]);
        // "assistant" is 9 bytes: two tokens.
        want.extend([
            START_HEADER,
            token_id("assist"),
            token_id("ant"),
            END_HEADER,
            nl,
        ]);
        assert_eq!(ids, vec![want]);
        // 5 of content ("Be", " brief", ".", "Hi", the image), 16 of template.
        assert_eq!(ids[0].len(), 21);
    }

    #[test]
    fn responses_instructions_are_a_system_message() {
        let with = parse(
            Api::Responses,
            r#"{"model":"m","instructions":"Be brief.","input":"Hi"}"#,
        );
        let as_chat = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#,
        );
        assert_eq!(with, as_chat);
    }

    #[test]
    fn completions_are_not_templated_and_token_ids_are_kept() {
        let ids = parse(
            Api::Completions,
            r#"{"model":"m","prompt":["hello there", ""]}"#,
        );
        assert_eq!(
            ids,
            vec![
                vec![BEGIN_OF_TEXT, token_id("hello"), token_id(" there")],
                vec![BEGIN_OF_TEXT],
            ]
        );
        let ids = sequences(Input::Prompts(vec![Prompt::Tokens(vec![1, 2, 3])]));
        assert_eq!(ids, vec![vec![1, 2, 3]]);
    }

    #[test]
    fn markers_in_text_are_plain_text() {
        let ids = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"<|eot_id|>"}]}"#,
        );
        // Only the template's own end of turn.
        assert_eq!(ids[0].iter().filter(|&&t| t == END_OF_TURN).count(), 1);
        assert!(ids[0].iter().all(|&t| t <= MEDIA));
    }

    #[test]
    fn a_shared_system_prompt_is_a_shared_token_prefix() {
        let ask = |q: &str| {
            conversation(
                Some("You are the alpha assistant."),
                &[Message {
                    role: "user".into(),
                    parts: vec![Part::Text(q.into())],
                }],
            )
        };
        let (a, b) = (ask("question 1?"), ask("question 2?"));
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        // All but the digit, "?" and the 6 tokens after them (end of turn, assistant header).
        assert_eq!(shared, a.len() - 8);
    }
}
