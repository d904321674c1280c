//! `tollgate report`: per-tenant, per-model totals from an event file.

use std::collections::BTreeMap;
use std::io::BufRead;

use rust_decimal::Decimal;

use crate::event::Event;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub calls: u64,
    /// Calls the proxy refused (auth, budget, rate, bad request).
    pub rejected: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: Decimal,
}

/// Totals keyed by (tenant, model).
pub type Table = BTreeMap<(String, String), Totals>;

/// (tenant, model) -> totals; plus the number of lines that were not events.
pub fn totals(reader: impl BufRead) -> std::io::Result<(Table, u64)> {
    let mut out = Table::new();
    let mut bad = 0;
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Some(d) = serde_json::from_str::<Event>(&line)
            .ok()
            .and_then(|e| e.call_data())
        else {
            bad += u64::from(serde_json::from_str::<Event>(&line).is_err());
            continue;
        };
        // Grouped by the model asked for, as priced; rejected calls land in
        // the same row as served ones.
        let model = d
            .request_model
            .or(d.response_model)
            .unwrap_or_else(|| format!("({})", d.operation));
        let t = out.entry((d.tenant, model)).or_default();
        t.calls += d.calls;
        t.rejected += u64::from(d.outcome.as_str().starts_with("rejected_"));
        t.input_tokens += d.usage.input_tokens;
        t.output_tokens += d.usage.output_tokens;
        t.cost += d.cost;
    }
    Ok((out, bad))
}

/// Renders the totals as a fixed-width table.
pub fn render(totals: &Table) -> String {
    let mut s = format!(
        "{:<16} {:<32} {:>7} {:>8} {:>12} {:>12} {:>14}\n",
        "tenant", "model", "calls", "rejected", "input_tok", "output_tok", "cost_usd"
    );
    let mut sum = Totals::default();
    for ((tenant, model), t) in totals {
        s += &format!(
            "{:<16} {:<32} {:>7} {:>8} {:>12} {:>12} {:>14}\n",
            tenant,
            model,
            t.calls,
            t.rejected,
            t.input_tokens,
            t.output_tokens,
            t.cost.normalize()
        );
        sum.calls += t.calls;
        sum.rejected += t.rejected;
        sum.input_tokens += t.input_tokens;
        sum.output_tokens += t.output_tokens;
        sum.cost += t.cost;
    }
    s += &format!(
        "{:<16} {:<32} {:>7} {:>8} {:>12} {:>12} {:>14}\n",
        "TOTAL",
        "",
        sum.calls,
        sum.rejected,
        sum.input_tokens,
        sum.output_tokens,
        sum.cost.normalize()
    );
    s
}
