//! The cost formula of DESIGN §7, exact in `rust_decimal`.

use rust_decimal::Decimal;

use crate::config::ModelPrice;
use crate::event::Usage;

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// `(input - cache_read - cache_write) * input + cache_read * cache_read_input
/// + cache_write * cache_write_input + output * output`, prices per million.
///
/// The cache writes kept an hour (a subset of `cache_write`) are priced at
/// `cache_write_1h_input` instead; it defaults to `cache_write_input`, which
/// makes this DESIGN §7's formula exactly.
pub fn cost(p: &ModelPrice, u: &Usage) -> Decimal {
    let uncached = u
        .input_tokens
        .saturating_sub(u.cache_read_input_tokens)
        .saturating_sub(u.cache_write_input_tokens);
    let write_1h = u
        .cache_write_1h_input_tokens
        .min(u.cache_write_input_tokens);
    // Prices are at most `MAX_PRICE` (config validation): even u64::MAX of
    // every kind of token fits, so none of this can overflow.
    let total = Decimal::from(uncached) * p.input
        + Decimal::from(u.cache_read_input_tokens) * p.cache_read_input
        + Decimal::from(u.cache_write_input_tokens - write_1h) * p.cache_write_input
        + Decimal::from(write_1h) * p.cache_write_1h_input
        + Decimal::from(u.output_tokens) * p.output;
    (total / MILLION).normalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn design_example() {
        // gpt-4o-mini: 12 input of which 3 cached, 40 output.
        let p = ModelPrice {
            input: d("0.15"),
            cache_read_input: d("0.075"),
            cache_write_input: d("0.15"),
            cache_write_1h_input: d("0.15"),
            output: d("0.60"),
            max_output_tokens: 16384,
        };
        let u = Usage {
            input_tokens: 12,
            cache_read_input_tokens: 3,
            output_tokens: 40,
            ..Usage::default()
        };
        // 9*0.15 + 3*0.075 + 40*0.60 = 1.35 + 0.225 + 24 = 25.575 per million
        assert_eq!(cost(&p, &u), d("0.000025575"));
    }

    #[test]
    fn the_dearest_price_and_the_most_tokens_do_not_overflow() {
        let max = crate::config::MAX_PRICE;
        let p = ModelPrice {
            input: max,
            cache_read_input: max,
            cache_write_input: max,
            cache_write_1h_input: max,
            output: max,
            max_output_tokens: u64::MAX,
        };
        let u = Usage {
            input_tokens: u64::MAX,
            cache_read_input_tokens: u64::MAX / 3,
            cache_write_input_tokens: u64::MAX / 3,
            cache_write_1h_input_tokens: u64::MAX / 3,
            output_tokens: u64::MAX,
            reasoning_output_tokens: u64::MAX,
        };
        assert!(cost(&p, &u) > Decimal::from(u64::MAX));
    }

    #[test]
    fn anthropic_cache_write() {
        let p = ModelPrice {
            input: d("3"),
            cache_read_input: d("0.30"),
            cache_write_input: d("3.75"),
            cache_write_1h_input: d("6"),
            output: d("15"),
            max_output_tokens: 8192,
        };
        let mut u = Usage {
            input_tokens: 1000 + 200 + 100,
            cache_read_input_tokens: 200,
            cache_write_input_tokens: 100,
            cache_write_1h_input_tokens: 0,
            output_tokens: 50,
            reasoning_output_tokens: 0,
        };
        // 1000*3 + 200*0.3 + 100*3.75 + 50*15 = 3000 + 60 + 375 + 750 = 4185
        assert_eq!(cost(&p, &u), d("0.004185"));
        // 40 of the writes kept an hour: 60*3.75 + 40*6 = 225 + 240 = 465
        // instead of 375.
        u.cache_write_1h_input_tokens = 40;
        assert_eq!(cost(&p, &u), d("0.004275"));
        // More hour-long writes than writes (no provider sends that) count
        // as all of them, not as extra tokens.
        u.cache_write_1h_input_tokens = 1000;
        assert_eq!(cost(&p, &u), d("0.00441"));
    }
}
