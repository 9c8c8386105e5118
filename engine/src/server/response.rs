//! Response bodies in the OpenAI shapes: whole completions and chat completions, their SSE
//! chunks, `usage`, and `logprobs` — completions' `{tokens, token_logprobs, top_logprobs,
//! text_offset}` (echoed prompt first, its first token `null`) and chat's `{content: [{token,
//! logprob, bytes, top_logprobs}]}`. Takes what the batcher reported per choice; gives JSON.

use serde_json::{json, Value};

use super::validation::{Kind, ValidRequest};
use crate::batcher::Finish;
use crate::logprobs::TokenLogprob;
use crate::tokenizer::Tokenizer;

/// What one choice has received so far.
#[derive(Debug, Default)]
pub struct ChoiceAcc {
    /// Generated text.
    pub text: String,
    /// The prompt's logprobs (echo with logprobs).
    pub prompt: Option<Vec<Option<TokenLogprob>>>,
    /// Logprobs of generated tokens not yet written (streaming) or all of them (whole).
    pub tokens: Vec<TokenLogprob>,
    /// Characters of text written before this point (completions' `text_offset`).
    pub offset: usize,
    /// Whether its first chunk went out (streaming).
    pub started: bool,
    pub finish: Option<Finish>,
}

/// Everything needed to write the bodies of one request.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub req: ValidRequest,
}

impl Ctx {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.req.kind, chunk) {
            (Kind::Text, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The prompt choice `index` continues.
    pub fn prompt_of(&self, index: usize) -> &super::validation::ValidPrompt {
        &self.req.prompts[index / self.req.n]
    }

    /// Usage over all choices: each prompt counted once, every choice's completion.
    pub fn usage(&self, choices: &[ChoiceAcc]) -> Value {
        let prompt: usize = self.req.prompts.iter().map(|p| p.ids.len()).sum();
        let completion: usize = choices.iter().filter_map(|c| c.finish.as_ref()).map(|f| f.completion_tokens).sum();
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// How logprobs name token `id`: its text, or `token_id:{id}` when asked.
    fn name(&self, tok: &Tokenizer, id: u32) -> String {
        match self.req.token_ids_as_text {
            true => format!("token_id:{id}"),
            false => tok.token_text(id),
        }
    }

    /// Completions' logprobs of the prompt (if echoed with logprobs) and `tokens`, offsets from `offset`.
    fn text_logprobs(&self, tok: &Tokenizer, prompt: Option<(&[u32], &[Option<TokenLogprob>])>, tokens: &[TokenLogprob], mut offset: usize) -> Value {
        let (mut strs, mut lps, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let top_map = |t: &TokenLogprob| -> Value { Value::Object(t.top.iter().map(|&(id, lp)| (self.name(tok, id), json!(lp))).collect()) };
        let mut push = |id: u32, lp: Option<&TokenLogprob>| {
            let s = self.name(tok, id);
            offsets.push(offset);
            offset += s.chars().count();
            strs.push(s);
            lps.push(lp.map_or(Value::Null, |l| json!(l.logprob)));
            tops.push(lp.map_or(Value::Null, top_map));
        };
        if let Some((ids, plps)) = prompt {
            for (i, &id) in ids.iter().enumerate() {
                push(id, plps.get(i).and_then(Option::as_ref));
            }
        }
        for t in tokens {
            push(t.id, Some(t));
        }
        json!({"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }

    /// Chat's logprobs of `tokens`.
    fn chat_logprobs(&self, tok: &Tokenizer, tokens: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f64| {
            let s = self.name(tok, id);
            json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
        };
        let content: Vec<Value> = tokens
            .iter()
            .map(|t| {
                let mut e = entry(t.id, t.logprob);
                e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            })
            .collect();
        json!({"content": content})
    }

    /// The logprobs of one choice's part (`null` unless asked).
    fn logprobs(&self, tok: &Tokenizer, index: usize, prompt: Option<&[Option<TokenLogprob>]>, tokens: &[TokenLogprob], offset: usize) -> Value {
        if self.req.options.logprobs.is_none() {
            return Value::Null;
        }
        match self.req.kind {
            Kind::Text => self.text_logprobs(tok, prompt.map(|p| (&self.prompt_of(index).ids[..], p)), tokens, offset),
            Kind::Chat => self.chat_logprobs(tok, tokens),
        }
    }

    /// The whole response.
    pub fn full(&self, tok: &Tokenizer, choices: &[ChoiceAcc]) -> Value {
        let body: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let reason = c.finish.as_ref().map(|f| f.reason.as_str());
                let echo = if self.req.echo { self.prompt_of(i).text.as_str() } else { "" };
                let lp = self.logprobs(tok, i, c.prompt.as_deref(), &c.tokens, 0);
                match self.req.kind {
                    Kind::Text => json!({"index": i, "text": format!("{echo}{}", c.text), "logprobs": lp, "finish_reason": reason}),
                    Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp, "finish_reason": reason}),
                }
            })
            .collect();
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model, "choices": body, "usage": self.usage(choices)})
    }

    /// One SSE chunk of choice `index`: `text` with the logprobs of its tokens (the echoed
    /// prompt's first, when `prompt` is given), and the finish reason on its last.
    pub fn chunk(&self, tok: &Tokenizer, index: usize, c: &mut ChoiceAcc, text: &str, prompt: Option<&[Option<TokenLogprob>]>) -> Value {
        let first = !c.started;
        c.started = true;
        let lp = self.logprobs(tok, index, prompt, &c.tokens, c.offset);
        c.tokens.clear();
        c.offset += text.chars().count();
        let reason = c.finish.as_ref().map(|f| f.reason.as_str());
        let choice = match self.req.kind {
            Kind::Text => json!({"index": index, "text": text, "logprobs": lp, "finish_reason": reason}),
            Kind::Chat => {
                let delta = if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// The last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, choices: &[ChoiceAcc]) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": self.usage(choices)})
    }
}
