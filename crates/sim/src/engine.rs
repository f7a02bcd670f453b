//! The engine model of one simulated server: a step-by-step scheduler in the manner of vLLM V1,
//! with no I/O and no clock of its own, so tests drive it in virtual time.
//!
//! # The model
//! - Requests wait in a FIFO queue. Each step, running sequences are served first (a decode
//!   takes one token of the step's budget, a prefill chunk takes up to the rest), then waiting
//!   ones are admitted while the batch has room (`max_num_seqs`), the budget is not spent
//!   (`max_num_batched_tokens`), and the KV cache can hold the prompt. A request the cache
//!   cannot hold blocks the queue behind it (head-of-line, as in vLLM); a request whose LoRA
//!   adapter finds no free slot (`max_lora`) is skipped, and the queue goes on without it.
//! - Admission takes the prompt's cached prefix blocks from the prefix cache ([`super::kv`]):
//!   those tokens need no prefill. At least one token is always computed, as in vLLM.
//! - A step lasts `step_base_ms + prefill_tokens x prefill_ms_per_token + decoding_seqs x
//!   decode_ms_per_seq` (+ `lora_load_ms` per adapter loaded). So time to first token is the
//!   queue wait plus the prefill of the uncached tokens (spread over steps shared with others),
//!   and time per output token grows with the batch.
//! - The step that completes a prefill yields the first token; each later step yields one more.
//!   A sequence that needs a new KV block when none is free preempts the most recently admitted
//!   sequence (recompute preemption: its blocks are freed, it goes back to the head of the queue
//!   and later recomputes prompt and output, possibly from cached prefix blocks).
//! - A request whose client went away (its event channel closed) leaves at the next step and
//!   frees its blocks.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::kv::{BlockId, KvCache};
use super::params::EngineParams;
use super::stats::{EngineGauges, Stats};

/// Simulated time in seconds since the engine's epoch.
pub type SimTime = f64;

/// Why a sequence stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced `max_tokens` tokens the client asked for.
    Length,
    /// It reached its natural end (the request gave no `max_tokens`).
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Token accounting of one finished sequence, as reported in `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: u32,
    pub finish_reason: FinishReason,
}

/// What the engine tells the HTTP layer about one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// One new output token (sent only for streaming requests).
    Token { index: u32 },
    /// The sequence is done; always the last event of a sequence that finishes.
    Finished { index: u32, usage: SeqUsage },
}

/// One sequence to generate, as submitted by the HTTP layer.
#[derive(Debug)]
pub struct SeqRequest {
    /// Position in the response's `choices` (a completions batch has several sequences).
    pub index: u32,
    pub prompt_tokens: u32,
    /// Chained hashes of the prompt's full blocks (see [`super::kv::block_hashes`]).
    pub block_hashes: Vec<u64>,
    pub max_tokens: u32,
    pub finish_reason: FinishReason,
    pub adapter: Option<Arc<str>>,
    /// Send a [`SeqEvent::Token`] per output token.
    pub stream: bool,
    pub events: mpsc::UnboundedSender<SeqEvent>,
}

#[derive(Debug)]
struct Seq {
    req: SeqRequest,
    arrival: SimTime,
    scheduled_at: Option<SimTime>,
    first_token_at: Option<SimTime>,
    last_token_at: SimTime,
    blocks: Vec<BlockId>,
    /// Tokens to prefill: the prompt, or prompt and output after a preemption.
    prefill_target: u32,
    /// Tokens whose KV is in the cache.
    computed: u32,
    cached_tokens: u32,
    generated: u32,
    /// Work planned for the current step.
    step_prefill: u32,
    step_decode: bool,
}

/// The engine of one simulated server.
#[derive(Debug)]
pub struct Engine {
    params: EngineParams,
    kv: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Resident LoRA adapters, least recently used first; at most `max_lora`.
    lora_slots: Vec<Arc<str>>,
    stats: Stats,
    planned: bool,
}

impl Engine {
    pub fn new(params: EngineParams) -> Engine {
        Engine {
            kv: KvCache::new(params.num_blocks),
            params,
            waiting: VecDeque::new(),
            running: Vec::new(),
            lora_slots: Vec::new(),
            stats: Stats::default(),
            planned: false,
        }
    }

    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    /// Drops every request and all cached state, as a server restart does. The requests' event
    /// channels close, which their HTTP handlers see.
    pub fn reset(&mut self) {
        *self = Engine::new(self.params.clone());
    }

    pub fn submit(&mut self, req: SeqRequest, now: SimTime) {
        let prefill_target = req.prompt_tokens.max(1);
        self.waiting.push_back(Seq {
            req,
            arrival: now,
            scheduled_at: None,
            first_token_at: None,
            last_token_at: now,
            blocks: Vec::new(),
            prefill_target,
            computed: 0,
            cached_tokens: 0,
            generated: 0,
            step_prefill: 0,
            step_decode: false,
        });
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Sequences waiting for a place in the batch.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn gauges(&self) -> EngineGauges {
        EngineGauges {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.kv.usage(),
            running_adapters: distinct_adapters(self.running.iter()),
            waiting_adapters: distinct_adapters(self.waiting.iter()),
        }
    }

    /// Plans the next step at `now` and returns how long it takes, or `None` when there is
    /// nothing to do. Every call must be followed by [`Engine::complete_step`] before the next.
    pub fn plan_step(&mut self, now: SimTime) -> Option<f64> {
        self.drop_cancelled();
        let p = &self.params;
        let bs = p.block_size;
        let mut budget = p.max_num_batched_tokens;
        let mut prefill_tokens = 0u32;
        let mut decodes = 0u32;
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            seq.step_prefill = 0;
            seq.step_decode = false;
            if budget == 0 {
                i += 1;
                continue;
            }
            if seq.computed < seq.prefill_target {
                let chunk = (seq.prefill_target - seq.computed).min(budget);
                plan_prefill(&mut self.kv, seq, chunk, bs);
                budget -= chunk;
                prefill_tokens += chunk;
                i += 1;
                continue;
            }
            // Decode: the KV of one more token must fit.
            let needed = (seq.computed + 1).div_ceil(bs) as usize;
            let mut self_preempted = false;
            while self.running[i].blocks.len() < needed {
                if let Some(id) = self.kv.allocate() {
                    self.running[i].blocks.push(id);
                    continue;
                }
                // No free block: preempt the latest admitted sequence, possibly this one.
                preempted = true;
                let Some(victim) = self.running.pop() else {
                    break;
                };
                let is_self = self.running.len() == i;
                self.preempt(victim);
                if is_self {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            self.running[i].step_decode = true;
            budget -= 1;
            decodes += 1;
            i += 1;
        }

        let mut lora_loads = 0u32;
        if !preempted {
            lora_loads = self.admit(now, &mut budget, &mut prefill_tokens);
        }
        if self.running.is_empty() {
            if let Some(stuck) = self.waiting.pop_front() {
                // Unreachable with validated parameters (a request never exceeds the cache);
                // failing the head keeps a bad request from stalling the server for good.
                tracing::error!("simulated engine could not schedule a lone request; dropping it");
                drop(stuck);
            }
            self.planned = false;
            return None;
        }
        self.planned = true;
        self.stats
            .iteration_tokens
            .observe(f64::from(prefill_tokens + decodes));
        let p = &self.params;
        let ms = p.step_base_ms
            + f64::from(prefill_tokens) * p.prefill_ms_per_token
            + f64::from(decodes) * p.decode_ms_per_seq
            + f64::from(lora_loads) * p.lora_load_ms;
        Some(ms / 1000.0)
    }

    /// Admits waiting sequences into the batch; returns the number of adapters loaded.
    fn admit(&mut self, now: SimTime, budget: &mut u32, prefill_tokens: &mut u32) -> u32 {
        let bs = self.params.block_size;
        let mut active: Vec<Arc<str>> = distinct_adapters(self.running.iter());
        let mut skipped = Vec::new();
        let mut loads = 0;
        while self.running.len() < self.params.max_num_seqs as usize && *budget > 0 {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if let Some(adapter) = &seq.req.adapter
                && !active.contains(adapter)
                && active.len() >= self.params.max_lora as usize
            {
                skipped.push(seq);
                continue;
            }
            let hashes = &seq.req.block_hashes;
            // Keep at least one token to compute: a fully cached prompt still needs a forward
            // pass to produce its first token.
            let cacheable = (((seq.prefill_target - 1) / bs) as usize).min(hashes.len());
            let (matched, matched_free) = self.kv.match_prefix(&hashes[..cacheable]);
            let total = seq.prefill_target.div_ceil(bs) as usize;
            let new_blocks = (total - matched) as u32;
            if self.kv.num_free() - matched_free < new_blocks {
                self.waiting.push_front(seq);
                break;
            }
            self.kv.acquire_cached(hashes, matched, &mut seq.blocks);
            for _ in 0..new_blocks {
                match self.kv.allocate() {
                    Some(id) => seq.blocks.push(id),
                    None => break, // unreachable: counted above
                }
            }
            let cached = matched as u32 * bs;
            seq.computed = cached;
            if seq.scheduled_at.is_none() {
                seq.scheduled_at = Some(now);
                seq.cached_tokens = cached;
                self.stats.queue_time.observe(now - seq.arrival);
            }
            // Counted per admission, as vLLM counts per scheduling (a recompute queries again).
            self.stats.prefix_queries += u64::from(seq.prefill_target);
            self.stats.prefix_hits += u64::from(cached);
            if let Some(adapter) = seq.req.adapter.clone() {
                loads += self.use_lora_slot(&adapter, &active);
                if !active.contains(&adapter) {
                    active.push(adapter);
                }
            }
            let chunk = (seq.prefill_target - seq.computed).min(*budget);
            plan_prefill(&mut self.kv, &mut seq, chunk, bs);
            *budget -= chunk;
            *prefill_tokens += chunk;
            self.running.push(seq);
        }
        for seq in skipped.into_iter().rev() {
            self.waiting.push_front(seq);
        }
        loads
    }

    /// Makes `adapter` resident; returns 1 if it had to be loaded.
    fn use_lora_slot(&mut self, adapter: &Arc<str>, active: &[Arc<str>]) -> u32 {
        if let Some(pos) = self.lora_slots.iter().position(|a| a == adapter) {
            let a = self.lora_slots.remove(pos);
            self.lora_slots.push(a);
            return 0;
        }
        if self.lora_slots.len() >= self.params.max_lora as usize
            && let Some(pos) = self.lora_slots.iter().position(|a| !active.contains(a))
        {
            self.lora_slots.remove(pos);
        }
        self.lora_slots.push(adapter.clone());
        1
    }

    fn preempt(&mut self, mut seq: Seq) {
        self.kv.release(&seq.blocks);
        seq.blocks.clear();
        seq.prefill_target = seq.req.prompt_tokens.max(1) + seq.generated;
        seq.computed = 0;
        seq.step_prefill = 0;
        seq.step_decode = false;
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Ends the planned step at `now`: prefills advance, tokens are emitted, finished sequences
    /// release their blocks.
    pub fn complete_step(&mut self, now: SimTime) {
        if !self.planned {
            return;
        }
        self.planned = false;
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            let mut emitted = false;
            if seq.step_prefill > 0 {
                seq.computed += seq.step_prefill;
                emitted = seq.computed == seq.prefill_target;
            } else if seq.step_decode {
                seq.computed += 1;
                emitted = true;
            }
            seq.step_prefill = 0;
            seq.step_decode = false;
            let mut alive = true;
            if emitted {
                seq.generated += 1;
                self.stats.generation_tokens += 1;
                match seq.first_token_at {
                    None => {
                        seq.first_token_at = Some(now);
                        self.stats.ttft.observe(now - seq.arrival);
                    }
                    Some(_) => self.stats.itl.observe(now - seq.last_token_at),
                }
                seq.last_token_at = now;
                if seq.req.stream {
                    alive = seq
                        .req
                        .events
                        .send(SeqEvent::Token {
                            index: seq.req.index,
                        })
                        .is_ok();
                }
            }
            if !alive {
                let seq = self.running.remove(i);
                self.kv.release(&seq.blocks);
                self.stats.aborted += 1;
                continue;
            }
            if seq.generated >= seq.req.max_tokens {
                let seq = self.running.remove(i);
                self.finish(seq, now);
                continue;
            }
            i += 1;
        }
    }

    fn finish(&mut self, seq: Seq, now: SimTime) {
        self.kv.release(&seq.blocks);
        let usage = SeqUsage {
            prompt_tokens: seq.req.prompt_tokens,
            completion_tokens: seq.generated,
            cached_tokens: seq.cached_tokens,
            finish_reason: seq.req.finish_reason,
        };
        let s = &mut self.stats;
        s.prompt_tokens += u64::from(usage.prompt_tokens);
        match usage.finish_reason {
            FinishReason::Length => s.success_length += 1,
            FinishReason::Stop => s.success_stop += 1,
        }
        let scheduled = seq.scheduled_at.unwrap_or(seq.arrival);
        let first = seq.first_token_at.unwrap_or(now);
        s.e2e.observe(now - seq.arrival);
        s.prefill_time.observe(first - scheduled);
        s.decode_time.observe(now - first);
        s.inference_time.observe(now - scheduled);
        s.prompt_len.observe(f64::from(usage.prompt_tokens));
        s.generation_len.observe(f64::from(usage.completion_tokens));
        if usage.completion_tokens > 1 {
            s.tpot
                .observe((now - first) / f64::from(usage.completion_tokens - 1));
        }
        // The client may have gone already; nothing is owed to it then.
        let _ = seq.req.events.send(SeqEvent::Finished {
            index: seq.req.index,
            usage,
        });
    }

    /// Removes sequences whose client went away, freeing their blocks.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| !s.req.events.is_closed());
        let kv = &mut self.kv;
        self.running.retain(|s| {
            let keep = !s.req.events.is_closed();
            if !keep {
                kv.release(&s.blocks);
            }
            keep
        });
        self.stats.aborted += (before - self.waiting.len() - self.running.len()) as u64;
    }
}

/// Schedules a prefill chunk and registers the prompt blocks it fills in the prefix cache, so
/// later requests can hit them (as vLLM V1 caches blocks when they are scheduled).
fn plan_prefill(kv: &mut KvCache, seq: &mut Seq, chunk: u32, bs: u32) {
    seq.step_prefill = chunk;
    let start = (seq.computed / bs) as usize;
    let end = (((seq.computed + chunk) / bs) as usize).min(seq.req.block_hashes.len());
    for b in start..end {
        if let Some(&id) = seq.blocks.get(b) {
            kv.set_hash(id, seq.req.block_hashes[b]);
        }
    }
}

fn distinct_adapters<'a>(seqs: impl Iterator<Item = &'a Seq>) -> Vec<Arc<str>> {
    let mut out: Vec<Arc<str>> = Vec::new();
    for s in seqs {
        if let Some(a) = &s.req.adapter
            && !out.contains(a)
        {
            out.push(a.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{block_hashes, chain_seed};

    /// Drives an engine in virtual time: submissions at given times, steps back to back.
    struct Harness {
        engine: Engine,
        now: SimTime,
        step_end: Option<SimTime>,
    }

    struct Client {
        rx: mpsc::UnboundedReceiver<SeqEvent>,
        submitted: SimTime,
        first_token: Option<SimTime>,
        finished: Option<(SimTime, SeqUsage)>,
        tokens: u32,
    }

    impl Harness {
        fn new(params: EngineParams) -> Harness {
            Harness {
                engine: Engine::new(params),
                now: 0.0,
                step_end: None,
            }
        }

        fn submit(&mut self, tokens: &[u32], max_tokens: u32, adapter: Option<&str>) -> Client {
            let p = self.engine.params().clone();
            let (tx, rx) = mpsc::unbounded_channel();
            let model = adapter.unwrap_or(&p.model);
            let req = SeqRequest {
                index: 0,
                prompt_tokens: tokens.len() as u32,
                block_hashes: block_hashes(chain_seed(model, None), tokens, p.block_size),
                max_tokens,
                finish_reason: FinishReason::Length,
                adapter: adapter.map(Arc::from),
                stream: true,
                events: tx,
            };
            self.engine.submit(req, self.now);
            Client {
                rx,
                submitted: self.now,
                first_token: None,
                finished: None,
                tokens: 0,
            }
        }

        /// Runs steps until `t`, recording events into the clients.
        fn run_until(&mut self, t: SimTime, clients: &mut [&mut Client]) {
            loop {
                if self.step_end.is_none() {
                    match self.engine.plan_step(self.now) {
                        Some(d) => self.step_end = Some(self.now + d),
                        None => {
                            self.now = t;
                            return;
                        }
                    }
                }
                let end = self.step_end.unwrap_or(t);
                if end > t {
                    self.now = t;
                    return;
                }
                self.now = end;
                self.step_end = None;
                self.engine.complete_step(end);
                for c in clients.iter_mut() {
                    c.drain(end);
                }
            }
        }

        fn run_to_idle(&mut self, clients: &mut [&mut Client]) {
            for _ in 0..1_000_000 {
                if self.engine.is_idle() {
                    return;
                }
                let t = self.now + 1.0;
                self.run_until(t, clients);
            }
            panic!("engine never went idle");
        }
    }

    impl Client {
        fn drain(&mut self, now: SimTime) {
            while let Ok(ev) = self.rx.try_recv() {
                match ev {
                    SeqEvent::Token { .. } => {
                        self.tokens += 1;
                        self.first_token.get_or_insert(now);
                    }
                    SeqEvent::Finished { usage, .. } => self.finished = Some((now, usage)),
                }
            }
        }
        fn ttft(&self) -> f64 {
            self.first_token.expect("no first token") - self.submitted
        }
    }

    /// `n` token ids of their own for each `seed`.
    fn tokens(n: u32, seed: u8) -> Vec<u32> {
        (0..n).map(|i| u32::from(seed) * 100_000 + i).collect()
    }

    fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
        [a, b].concat()
    }

    #[test]
    fn lone_request_timing_follows_the_model() {
        let p = EngineParams::default();
        let mut h = Harness::new(p.clone());
        // 100 prompt tokens; 10 output tokens.
        let mut c = h.submit(&tokens(100, 1), 10, None);
        h.run_to_idle(&mut [&mut c]);
        let prefill = (p.step_base_ms + 100.0 * p.prefill_ms_per_token) / 1000.0;
        assert!((c.ttft() - prefill).abs() < 1e-9, "ttft {}", c.ttft());
        let (end, usage) = c.finished.unwrap();
        let decode = 9.0 * (p.step_base_ms + p.decode_ms_per_seq) / 1000.0;
        assert!((end - (prefill + decode)).abs() < 1e-9);
        assert_eq!(c.tokens, 10);
        assert_eq!(usage.completion_tokens, 10);
        assert_eq!(usage.prompt_tokens, 100);
    }

    #[test]
    fn ttft_rises_with_queue_depth() {
        let p = EngineParams {
            max_num_seqs: 4,
            ..EngineParams::default()
        };
        let mut h = Harness::new(p);
        let mut clients: Vec<Client> = (0..12)
            .map(|i| h.submit(&tokens(500, i), 20, None))
            .collect();
        let mut refs: Vec<&mut Client> = clients.iter_mut().collect();
        h.run_to_idle(&mut refs);
        let ttfts: Vec<f64> = clients.iter().map(Client::ttft).collect();
        // Each batch of four waits for the one before it to decode its 19 remaining tokens.
        let decode_floor = 19.0 * EngineParams::default().step_base_ms / 1000.0;
        assert!(ttfts[4] - ttfts[0] >= decode_floor, "{ttfts:?}");
        assert!(ttfts[8] - ttfts[4] >= decode_floor, "{ttfts:?}");
        assert!(ttfts.windows(2).all(|w| w[1] >= w[0]), "{ttfts:?}");
        assert!(h.engine.stats().queue_time.count() == 12);
    }

    #[test]
    fn tpot_grows_with_batch_size() {
        let run = |n: u8| {
            let mut h = Harness::new(EngineParams::default());
            let mut clients: Vec<Client> =
                (0..n).map(|i| h.submit(&tokens(10, i), 50, None)).collect();
            let mut refs: Vec<&mut Client> = clients.iter_mut().collect();
            h.run_to_idle(&mut refs);
            let c = &clients[0];
            (c.finished.unwrap().0 - c.first_token.unwrap()) / 49.0
        };
        let alone = run(1);
        let crowded = run(64);
        assert!(crowded > alone * 1.5, "alone {alone} crowded {crowded}");
    }

    #[test]
    fn repeated_prefix_skips_prefill_and_counts_hits() {
        let mut h = Harness::new(EngineParams::default());
        let shared = tokens(1000, 3);
        let mut a = h.submit(&cat(&shared, &tokens(3, 4)), 4, None);
        h.run_to_idle(&mut [&mut a]);
        let hits_before = h.engine.stats().prefix_hits;
        let mut b = h.submit(&cat(&shared, &tokens(3, 5)), 4, None);
        h.run_to_idle(&mut [&mut b]);
        let hits = h.engine.stats().prefix_hits - hits_before;
        assert!(hits >= 992, "hits {hits}");
        assert!(b.ttft() < a.ttft() * 0.5, "a {} b {}", a.ttft(), b.ttft());
        assert_eq!(b.finished.unwrap().1.cached_tokens as u64, hits);
        // A different model (adapter) never shares the blocks.
        let mut h2 = Harness::new(EngineParams {
            lora_adapters: vec!["ad".into()],
            ..EngineParams::default()
        });
        let mut c = h2.submit(&shared, 2, None);
        let mut d = h2.submit(&shared, 2, Some("ad"));
        h2.run_to_idle(&mut [&mut c, &mut d]);
        assert_eq!(d.finished.unwrap().1.cached_tokens, 0);
    }

    #[test]
    fn kv_usage_rises_with_long_requests_and_falls_after() {
        let mut h = Harness::new(EngineParams::default());
        let mut clients: Vec<Client> = (0..8)
            .map(|i| h.submit(&tokens(2000, i), 30, None))
            .collect();
        let mut refs: Vec<&mut Client> = clients.iter_mut().collect();
        // Chunked prefill admits about one 2,000-token prompt per step (2,048-token budget).
        h.run_until(3.0, &mut refs);
        let g = h.engine.gauges();
        assert_eq!(g.running, 8, "{g:?}");
        // 8 x 2000 tokens of 32,768: about half the cache.
        assert!(g.kv_usage > 0.45, "{g:?}");
        h.run_to_idle(&mut refs);
        assert_eq!(h.engine.gauges().kv_usage, 0.0);
    }

    #[test]
    fn full_cache_queues_requests_and_preempts() {
        let p = EngineParams {
            num_blocks: 64, // 1024 tokens
            max_model_len: 1024,
            ..EngineParams::default()
        };
        let mut h = Harness::new(p);
        // Three 300-token prompts fit (57 blocks); their growth forces preemption, and a fourth
        // request must wait for room.
        let mut clients: Vec<Client> = (0..4)
            .map(|i| h.submit(&tokens(300, i), 200, None))
            .collect();
        let mut refs: Vec<&mut Client> = clients.iter_mut().collect();
        h.run_until(0.2, &mut refs);
        let g = h.engine.gauges();
        assert_eq!((g.running, g.waiting), (3, 1), "{g:?}");
        h.run_to_idle(&mut refs);
        assert!(h.engine.stats().preemptions > 0);
        for c in &clients {
            assert_eq!(c.finished.unwrap().1.completion_tokens, 200);
            assert_eq!(c.tokens, 200, "a preempted sequence must not repeat tokens");
        }
    }

    #[test]
    fn lora_slots_limit_the_batch_and_loading_costs_time() {
        let p = EngineParams {
            lora_adapters: vec!["a".into(), "b".into()],
            max_lora: 1,
            ..EngineParams::default()
        };
        let mut h = Harness::new(p.clone());
        let mut a = h.submit(&tokens(2, 0), 5, Some("a"));
        let mut b = h.submit(&tokens(2, 0), 5, Some("b"));
        let mut base = h.submit(&tokens(2, 0), 5, None);
        h.run_until(0.001, &mut [&mut a, &mut b, &mut base]);
        let g = h.engine.gauges();
        assert_eq!(g.running, 2, "b waits for a's slot: {g:?}");
        assert_eq!(g.waiting_adapters, vec![Arc::<str>::from("b")]);
        h.run_to_idle(&mut [&mut a, &mut b, &mut base]);
        assert!(b.ttft() > a.finished.unwrap().0, "b starts after a ends");
        let unloaded = (p.step_base_ms + 2.0 * p.prefill_ms_per_token) / 1000.0;
        assert!(a.ttft() >= unloaded + p.lora_load_ms / 1000.0 - 1e-9);
    }

    #[test]
    fn cancelled_requests_free_their_blocks() {
        let mut h = Harness::new(EngineParams::default());
        let c = h.submit(&tokens(2000, 1), 100, None);
        let mut other = h.submit(&tokens(1, 9), 1, None);
        h.run_until(0.4, &mut [&mut other]);
        assert!(h.engine.gauges().kv_usage > 0.0);
        drop(c);
        h.run_to_idle(&mut [&mut other]);
        assert_eq!(h.engine.gauges().kv_usage, 0.0);
        assert_eq!(h.engine.stats().aborted, 1);
    }
}
