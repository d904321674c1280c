//! Limits: the **admit** phase of a request (rate limits, then the budget
//! reservation) and the **settle** step of its call.
//!
//! The reservation is the worst case (DESIGN §7): an upper bound on input
//! tokens priced at the dearest input rate, plus the output cap at the output
//! rate. The bound is the body's byte length (every token is at least one
//! byte; JSON escaping only lengthens text) plus a per-item allowance for
//! content passed by reference. Only when that bound would be refused is the
//! input counted with tiktoken, off the async workers.

pub mod budget;
pub mod ledger;
pub mod rate;
pub mod state;

use bytes::Bytes;
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::config::{ModelPrice, Policy, Provider, Tenant, Upstream};
use crate::meter::{tokens, Operation, RequestInfo};
use budget::{BudgetExceeded, BudgetStore, MemoryStore, Reservation};
use rate::{RateLimited, RateLimits, Remaining, TokenCharge};

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

pub struct Limits {
    pub budgets: MemoryStore,
    pub rates: RateLimits,
}

/// What admission granted a call; settled when the call ends.
#[derive(Debug, Default)]
pub struct Admission {
    reservation: Option<Reservation>,
    charge: Option<TokenCharge>,
    pub remaining: Remaining,
    /// The output cap (one choice) the budget reservation assumed for a
    /// request that names none, on a route whose request can carry one
    /// (see [`crate::meter::request::output_cap_field`]). The proxy adds it
    /// to an OpenAI request, so the upstream cannot generate past what was
    /// reserved.
    pub output_cap: Option<u64>,
}

#[derive(Debug)]
pub enum Refusal {
    Budget(BudgetExceeded),
    Rate(RateLimited),
}

/// The facts of the request admission needs.
pub struct Ask<'a> {
    pub policy: &'a Policy,
    pub tenant: &'a Tenant,
    pub upstream: &'a Upstream,
    pub op: Operation,
    pub info: &'a RequestInfo,
    pub body: &'a Bytes,
}

impl Limits {
    pub fn new(budgets: MemoryStore) -> Limits {
        Limits {
            budgets,
            rates: RateLimits::default(),
        }
    }

    pub async fn admit(&self, ask: Ask<'_>, now: OffsetDateTime) -> Result<Admission, Refusal> {
        let mut admission = Admission::default();
        if let Some(rl) = &ask.tenant.rate_limit {
            // A cheap estimate: about four bytes a token; corrected after.
            let est = if ask.op.is_metered() {
                (ask.body.len() as u64).div_ceil(4)
            } else {
                0
            };
            let (charge, remaining) = self
                .rates
                .admit(&ask.tenant.id, rl, est)
                .map_err(Refusal::Rate)?;
            admission.charge = Some(charge);
            admission.remaining = remaining;
        }
        if let Some(budget) = &ask.tenant.budget {
            // Context the provider adds from its own store, on top of
            // whatever bounds or counts the body.
            let stored = stored_context(&ask);
            let price = request_price(&ask);
            let cost_of = |input| worst_case(&ask, price, input);
            let bound = cost_of(input_bound(&ask) + stored);
            let reservation = match self.budgets.reserve(&ask.tenant.id, budget, bound, now) {
                Ok(r) => r,
                Err(first) => {
                    // Counting cannot help when even no input at all would
                    // not fit (an exhausted tenant retrying a large body
                    // cost a tokenizer pass, up to 0.3 s of CPU, each time).
                    // (A count is at least its framing, 3 tokens.)
                    if cost_of(stored + 3) > first.remaining {
                        return Err(Refusal::Budget(first));
                    }
                    // The byte bound is too coarse to admit: count tokens.
                    let Some(counted) = counted_input(&ask).await else {
                        return Err(Refusal::Budget(first));
                    };
                    let amount = cost_of(counted + stored);
                    self.budgets
                        .reserve(&ask.tenant.id, budget, amount, now)
                        .map_err(Refusal::Budget)?
                }
            };
            admission.reservation = Some(reservation);
            admission.output_cap = output_cap(&ask, price);
        }
        Ok(admission)
    }

    /// Settles a call: the actual cost replaces its reservation (or is
    /// recorded, for tenants without a budget), and the token rate limit is
    /// charged what the estimate missed.
    pub fn settle(
        &self,
        tenant: &str,
        admission: Option<Admission>,
        cost: Decimal,
        input_tokens: u64,
        output_tokens: u64,
        at: OffsetDateTime,
    ) {
        let admission = admission.unwrap_or_default();
        match admission.reservation {
            Some(r) => self.budgets.settle(r, cost, at),
            None => self.budgets.record(tenant, cost, at),
        }
        if let Some(charge) = admission.charge {
            self.rates
                .correct(tenant, charge, input_tokens, output_tokens);
        }
    }
}

/// Upper bound on the input tokens the body carries, without tokenizing
/// (stored context, which it only names, is added by `admit`).
fn input_bound(ask: &Ask<'_>) -> u64 {
    if !ask.op.is_metered() {
        return 0;
    }
    use crate::meter::needles::{
        positions, BASE64_STRING, FILE_DATA_KEY, FILE_ID_KEY, FILE_URL_KEY, IMAGE_URL_KEY, URL_KEY,
    };
    // Inline files are billed by what they hold (an image's pixels, a
    // PDF's pages as text and image), not by their base64 text, which can
    // be far shorter: each is an item too. OpenAI's `file_data`, and
    // Anthropic's `"type": "base64"` sources (only there: an embeddings
    // request's `"encoding_format": "base64"` is no file).
    let inline = positions(&FILE_DATA_KEY, ask.body).count() as u64
        + if ask.op == Operation::Messages {
            positions(&BASE64_STRING, ask.body).count() as u64
        } else {
            0
        };
    let by_reference = [&URL_KEY, &FILE_ID_KEY, &FILE_URL_KEY]
        .iter()
        .map(|f| positions(f, ask.body).count() as u64)
        .sum::<u64>()
        + inline
        // The Responses API's `"image_url": "<url>"` (chat's `image_url` is
        // an object whose `url` is counted above).
        + positions(&IMAGE_URL_KEY, ask.body)
            .filter(|&at| {
                let mut rest = ask.body[at + IMAGE_URL_KEY.needle().len()..]
                    .iter()
                    .filter(|b| !b.is_ascii_whitespace());
                rest.next() == Some(&b':') && rest.next() == Some(&b'"')
            })
            .count() as u64;
    ask.body.len() as u64 + by_reference * ask.policy.url_item_tokens
}

/// The allowance for input the provider adds from its own store: a
/// `previous_response_id`, a `conversation` or (Responses API) a stored
/// `prompt` or an `item_reference` input. A tiny body can bill a long
/// conversation.
fn stored_context(ask: &Ask<'_>) -> u64 {
    let responses = ask.op == Operation::Responses;
    let stored = ask.info.stored_context
        || (responses && ask.info.prompt)
        || (responses && memchr::memmem::find(ask.body, b"\"item_reference\"").is_some());
    if stored {
        ask.policy.stored_context_tokens
    } else {
        0
    }
}

/// Input tokens counted with tiktoken (plus message framing and the
/// by-reference allowance); `None` for routes without a text body, or when
/// the count did not finish (the caller then refuses on the byte bound,
/// which was already too large: admitting on anything less would break it).
async fn counted_input(ask: &Ask<'_>) -> Option<u64> {
    if !ask.op.is_metered() {
        return None;
    }
    let body = ask.body.clone();
    let model = ask.info.model.clone().unwrap_or_default();
    let per_item = ask.policy.url_item_tokens;
    tokens::estimate_blocking(move || {
        crate::meter::request::input_text(&body).tokens(&model, per_item)
    })
    .await
}

/// The output cap a reservation assumed for a request that names none, on
/// a route whose request can carry one: the model's `max_output_tokens`. A
/// request model with no price of its own reserved as the dearest model;
/// its response may be priced as any configured model, so it is capped at
/// the smallest of theirs, which keeps every model's cost within its own
/// worst case.
fn output_cap(ask: &Ask<'_>, price: Option<&ModelPrice>) -> Option<u64> {
    if ask.info.max_output_tokens.is_some()
        || crate::meter::request::output_cap_field(ask.op).is_none()
    {
        return None;
    }
    match price {
        Some(p) => Some(p.max_output_tokens),
        None => ask
            .policy
            .models
            .values()
            .map(|p| p.max_output_tokens)
            .min(),
    }
}

/// The request model's price, exactly or as a dated snapshot of a
/// configured name; looked up once an admission.
fn request_price<'p>(ask: &Ask<'p>) -> Option<&'p ModelPrice> {
    let model = ask.info.model.as_deref().unwrap_or("");
    ask.policy.price(model, model)
}

/// Worst-case cost of a call with `input` tokens; `price`: the request
/// model's ([`request_price`]).
fn worst_case(ask: &Ask<'_>, price: Option<&ModelPrice>, input: u64) -> Decimal {
    if ask.upstream.provider == Provider::Generic {
        return ask.upstream.price_per_call;
    }
    // The request model, exactly or as a dated snapshot of a configured
    // name. Settling also tries the response model, which only the upstream
    // names (`gpt-4o` answered as `gpt-4o-2024-08-06`, an alias answered as
    // another name): a request model with no price of its own reserves as the
    // dearest configured model, so a call settled at a response model's price
    // never spends past what it reserved.
    if !ask.op.is_metered() {
        return Decimal::ZERO;
    }
    match price {
        Some(p) => worst_case_at(ask, p, input),
        None => ask
            .policy
            .models
            .values()
            .map(|p| worst_case_at(ask, p, input))
            .max()
            .unwrap_or(Decimal::ZERO),
    }
}

/// The worst case of a call priced as `p`.
fn worst_case_at(ask: &Ask<'_>, p: &ModelPrice, input: u64) -> Decimal {
    let output = match ask.op {
        Operation::Embeddings => 0,
        _ => ask
            .info
            .max_output_tokens
            .unwrap_or(p.max_output_tokens)
            .saturating_mul(ask.info.choices.max(1)),
    };
    let input_rate = p
        .input
        .max(p.cache_read_input)
        .max(p.cache_write_input)
        .max(p.cache_write_1h_input);
    (Decimal::from(input) * input_rate + Decimal::from(output) * p.output) / MILLION
}

#[cfg(test)]
mod tests;
