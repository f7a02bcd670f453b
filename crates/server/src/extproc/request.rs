//! What the stream reads from Envoy's messages: the request headers (path, subset hint, the
//! headers the pool reads later), the served endpoint Envoy reports, and, once the request is
//! complete, the request as admission and the pick need it: its body parsed once (the model, a
//! rewrite, the prefix hashes), its pool, objective, priority and flow.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::ext_proc::v3::HttpHeaders;
use envoy_types::pb::google::protobuf::value::Kind;
use fleetpick_core::fleet::Fleet;
use fleetpick_core::rewrite::Restorer;
use fleetpick_core::session::{SessionKey, cookie_value};
use fleetpick_protocol::openai::{Api, InferenceRequest, replace_model};

use super::refusal::Refusal;
use fleetpick_protocol::headers::{
    FAIRNESS_HEADER, LB_NAMESPACE, OBJECTIVE_HEADER, SERVED_KEY, SUBSET_KEY, SUBSET_NAMESPACE,
};

/// The request headers as they came, and the subset hint that came with them.
#[derive(Debug, Default)]
pub(super) struct RequestHead {
    pub path: String,
    /// The proxy's subset hint: `None` when it gave none; `Some(empty)` means nothing is allowed.
    pub subset: Option<Vec<SocketAddr>>,
    /// Kept for what is read once the model (and so the pool) is known: the objective, the
    /// session key, the fairness key, the trace context.
    headers: HttpHeaders,
}

impl RequestHead {
    pub fn new(headers: HttpHeaders, metadata: Option<&Metadata>) -> RequestHead {
        RequestHead {
            path: header(&headers, ":path").unwrap_or_default(),
            subset: subset_hint(metadata),
            headers,
        }
    }

    /// A request header's value, by lowercase name; `None` when absent or empty.
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.headers, name).filter(|v| !v.is_empty())
    }

    /// The request's session key, from the header or cookie the pool names.
    fn session_key(&self, key: &SessionKey) -> Option<String> {
        match key {
            SessionKey::Header(name) => self.header(name),
            SessionKey::Cookie(name) => {
                let cookies = header(&self.headers, "cookie")?;
                cookie_value(&cookies, name)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            }
        }
    }
}

/// A complete request, read: what admission and the pick need, kept while it waits in the
/// queue.
#[derive(Debug)]
pub(super) struct Request {
    pub head: RequestHead,
    /// The body as it goes upstream (rewritten when the model is).
    pub body: Vec<u8>,
    /// It has a body: the answer goes with the body, not the headers.
    pub has_body: bool,
    /// The body ended with end of stream: the last piece sent back carries it.
    pub body_end: bool,
    /// The model as the client named it ("" when it names none).
    pub client_model: String,
    /// The model that serves it, after any rewrite; `None` for a request that is not an
    /// inference request (any pool may serve it).
    pub model: Option<String>,
    /// Restores the client's model name in the response of a rewritten request.
    pub restore: Option<Restorer>,
    /// The prompt's prefix hashes (empty when the pool does not score prefixes).
    pub hashes: Vec<u64>,
    /// The pool serving `model`, by index in the generation the request is placed in.
    pub pool: Option<usize>,
    pub session_key: Option<String>,
    /// The request's InferenceObjective, by name ("" when it has none), and its priority.
    pub objective: String,
    pub priority: i32,
    /// The fairness key: `x-gateway-inference-fairness-id`, else the objective's name.
    pub flow: String,
}

/// A request that cannot be read: the refusal, and the model the client named if that much
/// was read (for the metrics).
#[derive(Debug)]
pub(super) struct Unreadable {
    pub refusal: Refusal,
    pub client_model: String,
}

/// The body, parsed: the client's model, the one serving it, and what a rewrite changed.
struct Parsed {
    client_model: String,
    model: Option<String>,
    body: Vec<u8>,
    restore: Option<Restorer>,
    hashes: Vec<u64>,
}

impl Request {
    /// Reads the complete request (`head`, `body`) in `fleet`, the generation it is placed in.
    /// `body_end`: the body ended with end of stream.
    pub fn read(
        fleet: &Fleet,
        head: RequestHead,
        body: Vec<u8>,
        body_end: bool,
        rng: &mut fastrand::Rng,
    ) -> Result<Request, Unreadable> {
        let has_body = !body.is_empty() || body_end;
        let parsed = match Api::from_path(&head.path) {
            Some(api) if has_body => parse(fleet, api, body, rng)?,
            Some(_) => {
                return Err(Unreadable {
                    refusal: Refusal::NoBody,
                    client_model: String::new(),
                });
            }
            // Not an inference request (GET /v1/models, /health): any endpoint by load.
            None => Parsed {
                client_model: String::new(),
                model: None,
                body,
                restore: None,
                hashes: Vec::new(),
            },
        };
        let mut request = Request {
            head,
            body: parsed.body,
            has_body,
            body_end,
            client_model: parsed.client_model,
            model: parsed.model,
            restore: parsed.restore,
            hashes: parsed.hashes,
            pool: None,
            session_key: None,
            objective: String::new(),
            priority: 0,
            flow: String::new(),
        };
        request.classify(fleet);
        Ok(request)
    }

    /// Its pool, and what the pool reads from the headers: session key, objective, flow.
    fn classify(&mut self, fleet: &Fleet) {
        let pool = self.model.as_deref().and_then(|m| fleet.pool_for(m));
        self.pool = pool;
        self.session_key = pool
            .and_then(|p| fleet.pools[p].sessions.as_ref())
            .and_then(|s| self.head.session_key(&s.key));
        let objective = pool.zip(self.model.as_deref()).and_then(|(p, m)| {
            let named = self.head.header(OBJECTIVE_HEADER);
            fleet.objective(p, m, named.as_deref())
        });
        self.priority = objective.map_or(0, |o| o.priority);
        self.objective = objective.map(|o| o.name.clone()).unwrap_or_default();
        // The fairness key matters only to a queue.
        self.flow = if pool.is_some_and(|p| fleet.pools[p].queue.is_some()) {
            self.head
                .header(FAIRNESS_HEADER)
                .unwrap_or_else(|| self.objective.clone())
        } else {
            String::new()
        };
    }
}

/// Parses an inference request's body once, and applies the fleet's model rewrite to it.
fn parse(
    fleet: &Fleet,
    api: Api,
    body: Vec<u8>,
    rng: &mut fastrand::Rng,
) -> Result<Parsed, Unreadable> {
    let req = InferenceRequest::parse(api, &body).map_err(|e| Unreadable {
        refusal: Refusal::BadBody(e),
        client_model: String::new(),
    })?;
    let (model, body, restore) = match fleet.rewrites.target(&req.model, rng) {
        Some(target) if target != req.model => {
            let Some(body) = replace_model(&body, &req.model, target) else {
                return Err(Unreadable {
                    refusal: Refusal::RewriteAmbiguous,
                    client_model: req.model,
                });
            };
            let restore = Restorer::new(&req.model, target);
            (target.to_string(), body, Some(restore))
        }
        _ => (req.model.clone(), body, None),
    };
    let hashes = prefix_hashes(fleet, &model, &req);
    Ok(Parsed {
        client_model: req.model,
        model: Some(model),
        body,
        restore,
        hashes,
    })
}

/// The prompt's prefix hashes for the `prefix` scorer, seeded by the model that serves the
/// request (its cache is the one that holds the prefix); none when that model's pool does not
/// score prefixes.
fn prefix_hashes(fleet: &Fleet, model: &str, req: &InferenceRequest) -> Vec<u64> {
    let weights = fleet.weights_for(fleet.pool_for(model), &fleet.weights);
    // Rendered only for a pool that scores prefixes.
    if weights.prefix <= 0.0 {
        return Vec::new();
    }
    match fleetpick_core::prompt::prefix_bytes(&req.input) {
        Some(prompt) => {
            fleetpick_core::prefix::prompt_hashes(model, req.cache_salt.as_deref(), &prompt)
        }
        None => Vec::new(),
    }
}

/// A header's value, by lowercase name (raw bytes as Envoy sends them, else the string value).
pub(super) fn header(h: &HttpHeaders, name: &str) -> Option<String> {
    let map = h.headers.as_ref()?;
    let hv = map.headers.iter().find(|hv| hv.key == name)?;
    if !hv.raw_value.is_empty() {
        return String::from_utf8(hv.raw_value.clone()).ok();
    }
    Some(hv.value.clone())
}

/// The subset hint: `None` when the proxy gave none; `Some(empty)` means nothing is allowed.
fn subset_hint(md: Option<&Metadata>) -> Option<Vec<SocketAddr>> {
    let fields = &md?.filter_metadata.get(SUBSET_NAMESPACE)?.fields;
    let list = match fields.get(SUBSET_KEY)?.kind.as_ref()? {
        Kind::ListValue(l) => l,
        _ => return Some(Vec::new()),
    };
    Some(
        list.values
            .iter()
            .filter_map(|v| match v.kind.as_ref()? {
                Kind::StringValue(s) => s.parse().ok(),
                _ => None,
            })
            .collect(),
    )
}

/// The endpoint Envoy reports it served the request from (after its retries).
pub(super) fn served_endpoint(md: Option<&Metadata>) -> Option<String> {
    match md?
        .filter_metadata
        .get(LB_NAMESPACE)?
        .fields
        .get(SERVED_KEY)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}
