use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" => Some("sk-upstream".into()),
        "ADMIN" => Some("admintoken".into()),
        _ => None,
    }
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token_env = "ADMIN"

[[upstreams]]
name = "openai"
prefix = "/openai/"
url = "http://127.0.0.1:9"
provider = "openai"
api_key_env = "OPENAI_API_KEY"

[[upstreams]]
name = "search"
prefix = "/tools/search"
url = "https://search.example.com"
provider = "generic"
price_per_call = "0.002"

[models."gpt-4.1"]
input = "2.00"
output = "8.00"

[[tenants]]
id = "acme"
keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
budget = { limit = "50.00", window = "month" }

[[sinks]]
type = "file"
path = "./events.jsonl"
"#;

#[test]
fn parses_the_example() {
    let p = parse(GOOD, "t.toml", &env).unwrap();
    let (up, rest) = p.route("/openai/v1/chat/completions").unwrap();
    assert_eq!(up.name, "openai");
    assert_eq!(rest, "/v1/chat/completions");
    assert!(p.route("/openaix/v1").is_none());
    assert!(p.route("/elsewhere").is_none());
    let (_, v) = up.credential.as_ref().unwrap();
    assert_eq!(v.to_str().unwrap(), "Bearer sk-upstream");
    assert!(v.is_sensitive());
    assert!(
        !format!("{p:?}").contains("sk-upstream"),
        "secrets leak in Debug"
    );
    let price = p.models.get("gpt-4.1").unwrap();
    assert_eq!(price.cache_read_input, price.input);
    let digest = hash_key("test");
    assert!(p
        .keys
        .contains_key(&<[u8; 32]>::try_from(hex::decode(&digest[7..]).unwrap()).unwrap()));
    assert_eq!(p.sinks[0].name, "file-0");
}

#[test]
fn unknown_key_names_key_and_line() {
    let src = GOOD.replace(
        "provider = \"generic\"",
        "provider = \"generic\"\ncolour = \"red\"",
    );
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.line, 19, "{e}");
    assert!(e.to_string().contains("colour"), "{e}");
}

#[test]
fn bad_value_names_key_and_line() {
    let src = GOOD.replace("window = \"month\"", "window = \"fortnight\"");
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "tenants[0].budget.window");
    assert_eq!(e.line, 28, "{e}");

    let src = GOOD.replace("input = \"2.00\"", "input = \"two\"");
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "models.gpt-4.1.input", "{e}");
    assert_eq!(e.line, 22, "{e}");
}

/// A secret put where a variable's name or another value belongs is never
/// shown in the error (`tollgate check` prints it; a reload logs it).
#[test]
fn errors_never_echo_a_secret_put_in_the_wrong_place() {
    let secret = "sk-proj-LIVE\\\"KEY-SECRET";
    let cases = [
        GOOD.replace("\"OPENAI_API_KEY\"", &format!("\"{secret}\"")),
        // Keys of letters, digits and '_' only (Groq, GitHub, ...).
        GOOD.replace("\"OPENAI_API_KEY\"", "\"gsk_8fJqSECRET2xYz\""),
        GOOD.replace("\"ADMIN\"", "\"Bearer admin-SECRET\""),
        GOOD.replace(
            "path = \"./events.jsonl\"",
            "type = \"http\"\nurl = \"http://127.0.0.1:9/e\"\nheaders = { authorization_env = \"tok-SECRET\" }",
        )
        .replace("type = \"file\"\n", ""),
        GOOD.replace(
            "keys = [\"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"]",
            "keys = \"tk-plain-SECRET\"",
        ),
        GOOD.replace("[[sinks]]", "[spool]\nmax_bytes = \"sk-\\\"x\\\" SECRET\"\n\n[[sinks]]"),
    ];
    for src in cases {
        let e = parse(&src, "t.toml", &env).unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(!e.key.is_empty() && e.line > 0, "{shown}");
    }
    // Credentials in a URL are refused, and not shown either.
    let src = GOOD.replace("http://127.0.0.1:9", "http://user:pw-SECRET@127.0.0.1:9");
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "upstreams[0].url", "{e}");
    assert!(!e.to_string().contains("SECRET"), "{e}");
    // A plausible name is still named.
    let src = GOOD.replace("\"OPENAI_API_KEY\"", "\"NOPE\"");
    let shown = parse(&src, "t.toml", &env).unwrap_err().to_string();
    assert!(
        shown.contains("environment variable NOPE is not set"),
        "{shown}"
    );
}

#[test]
fn unmetered_routes_is_forward_or_refuse_on_llm_upstreams() {
    let p = parse(GOOD, "t.toml", &env).unwrap();
    assert!(p.upstreams.iter().all(|u| !u.refuse_unmetered));
    let src = GOOD.replace(
        "api_key_env = \"OPENAI_API_KEY\"",
        "api_key_env = \"OPENAI_API_KEY\"\nunmetered_routes = \"refuse\"",
    );
    let p = parse(&src, "t.toml", &env).unwrap();
    let openai = p.upstreams.iter().find(|u| u.name == "openai").unwrap();
    assert!(openai.refuse_unmetered);
    for (from, to, key) in [
        (
            "price_per_call = \"0.002\"",
            "price_per_call = \"0.002\"\nunmetered_routes = \"refuse\"",
            "upstreams[1].unmetered_routes",
        ),
        (
            "api_key_env = \"OPENAI_API_KEY\"",
            "api_key_env = \"OPENAI_API_KEY\"\nunmetered_routes = \"block\"",
            "upstreams[0].unmetered_routes",
        ),
    ] {
        let e = parse(&GOOD.replace(from, to), "t.toml", &env).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
}

#[test]
fn missing_secret_is_an_error() {
    let src = GOOD.replace("\"OPENAI_API_KEY\"", "\"NOPE\"");
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "upstreams[0].api_key_env");
    assert_eq!(e.line, 12);
}

#[test]
fn prices_dated_snapshots_by_prefix() {
    let p = parse(GOOD, "t.toml", &env).unwrap();
    assert!(p.price("gpt-4.1", "").is_some());
    assert!(p.price("x", "gpt-4.1-2025-04-14").is_some());
    assert!(p.price("x", "gpt-4o").is_none());
    // A dated request model (reservations, or no response model).
    for dated in [
        "gpt-4.1-2025-04-14",
        "gpt-4.1-20250414",
        "gpt-4.1-0414",
        "gpt-4.1-latest",
    ] {
        assert!(p.price(dated, "").is_some(), "{dated}");
    }
    // Only a date may follow the name: a longer name is another model.
    for other in [
        "gpt-4.1-mini",
        "gpt-4.1-pro",
        "gpt-4.1-2025",
        "gpt-4.1-2025-04-1x",
        "gpt-4.1-041",
        "gpt-4.1-2025-13-01",
        "gpt-4.1-2025-04-32",
        "-latest",
        "gpt-4.1x2025-04-14",
        "-2025-04-14",
        "é-2025-04-14é",
        "éééééééééééé",
        "",
    ] {
        assert!(p.price(other, other).is_none(), "{other}");
    }
}

/// Prices above a dollar a token and budgets above 10^15 are refused: the
/// sums of money made from them must stay far from `Decimal`'s bound.
#[test]
fn prices_and_limits_past_their_bounds_are_refused() {
    let cases = [
        (
            "input = \"2.00\"",
            "input = \"1000000.01\"",
            "models.gpt-4.1.input",
        ),
        (
            "output = \"8.00\"",
            "output = \"5e28\"",
            "models.gpt-4.1.output",
        ),
        (
            "price_per_call = \"0.002\"",
            "price_per_call = \"2000000\"",
            "upstreams[1].price_per_call",
        ),
        (
            "limit = \"50.00\"",
            "limit = \"1000000000000001\"",
            "tenants[0].budget.limit",
        ),
    ];
    for (from, to, key) in cases {
        let e = parse(&GOOD.replace(from, to), "t.toml", &env).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.reason.contains("at most"), "{e}");
    }
    let at_bounds = GOOD
        .replace("input = \"2.00\"", "input = \"1000000\"")
        .replace("limit = \"50.00\"", "limit = \"1000000000000000\"");
    assert!(parse(&at_bounds, "t.toml", &env).is_ok());
    assert_eq!(MAX_MONEY, Decimal::from(10u64.pow(15)));
    assert_eq!(MAX_PRICE, Decimal::from(1_000_000));
}

#[test]
fn negative_cache_prices_are_refused() {
    for field in [
        "cache_read_input",
        "cache_write_input",
        "cache_write_1h_input",
    ] {
        let src = GOOD.replace(
            "output = \"8.00\"",
            &format!("output = \"8.00\"\n{field} = \"-0.5\""),
        );
        let e = parse(&src, "t.toml", &env).unwrap_err();
        assert_eq!(e.key, format!("models.gpt-4.1.{field}"), "{e}");
        assert!(e.reason.contains("negative"), "{e}");
    }
    let src = GOOD.replace(
        "output = \"8.00\"",
        "output = \"8.00\"\ncache_read_input = \"0\"",
    );
    assert!(parse(&src, "t.toml", &env).is_ok());
}

#[test]
fn a_spool_too_small_for_an_event_is_refused() {
    for small in ["0", "4095"] {
        let src = format!("{GOOD}\n[spool]\nmax_bytes = {small}\n");
        let e = parse(&src, "t.toml", &env).unwrap_err();
        assert_eq!(e.key, "spool.max_bytes", "{e}");
    }
    let src = format!("{GOOD}\n[spool]\nmax_bytes = 4096\n");
    assert_eq!(
        parse(&src, "t.toml", &env).unwrap().spool.segment_bytes,
        4096
    );
}

#[test]
fn proxy_and_admin_on_one_address_is_refused() {
    let src = GOOD.replace(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:18787\"\nadmin_listen = \"127.0.0.1:18787\"",
    );
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "server.admin_listen", "{e}");
    assert_eq!(e.line, 4, "{e}");
    let src = GOOD.replace(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:18787\"\nadmin_listen = \"0.0.0.0:18787\"",
    );
    assert!(parse(&src, "t.toml", &env).is_err());
    let src = GOOD.replace(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:18787\"\nadmin_listen = \"127.0.0.2:18787\"",
    );
    assert!(parse(&src, "t.toml", &env).is_ok());
    // Port 0 picks a free port for each.
    assert!(parse(GOOD, "t.toml", &env).is_ok());
}

/// A key that is missing is reported at the table that lacks it: the
/// error names a line (it named none, `file: key: reason`).
#[test]
fn a_missing_key_names_the_line_of_its_table() {
    let e = parse("[[sinks]]\ntype = \"http\"\n", "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "sinks[0].url", "{e}");
    assert_eq!(e.line, 1, "{e}");
    assert!(e.to_string().starts_with("t.toml:1: "), "{e}");
}

#[test]
fn errors_without_a_key_or_line_say_so_plainly() {
    let e = parse("[server]\nlisten = \n", "t.toml", &env).unwrap_err();
    assert!(e.key.is_empty());
    assert!(e.to_string().starts_with("t.toml:2: "), "{e}");
    assert!(!e.to_string().contains(": :"), "{e}");
    let e = read(Path::new("/nonexistent/tollgate.toml"))
        .err()
        .expect("no such file");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/tollgate.toml: cannot read: "),
        "{e}"
    );
}

#[test]
fn connection_limit_and_timeouts_must_be_positive() {
    for (line, key) in [
        ("max_connections = 0", "server.max_connections"),
        ("max_connections = 1000001", "server.max_connections"),
        (
            "request_body_timeout = \"0s\"",
            "server.request_body_timeout",
        ),
        (
            "request_body_timeout = \"soon\"",
            "server.request_body_timeout",
        ),
        ("header_read_timeout = \"0s\"", "server.header_read_timeout"),
        ("header_read_timeout = \"2h\"", "server.header_read_timeout"),
        ("write_timeout = \"0s\"", "server.write_timeout"),
        ("write_timeout = \"2h\"", "server.write_timeout"),
    ] {
        let src = GOOD.replace("[server]\n", &format!("[server]\n{line}\n"));
        let e = parse(&src, "t.toml", &env).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
    // Upstream and sink timeouts too: a zero deadline failed every call
    // (504, or 502 for the connect) or every delivery (retried forever);
    // waits past a day would overflow the clock when added to it.
    let anchors = [
        ("api_key_env = \"OPENAI_API_KEY\"\n", "upstreams[0]"),
        ("path = \"./events.jsonl\"\n", "sinks[0]"),
        ("shutdown_grace", "server"),
    ];
    for (anchor, line, key) in [
        (anchors[0], "timeout = \"0s\"", "timeout"),
        (anchors[0], "connect_timeout = \"0s\"", "connect_timeout"),
        (anchors[0], "timeout = \"2d\"", "timeout"),
        (anchors[1], "timeout = \"0ms\"", "timeout"),
        (anchors[1], "batch_max_wait = \"30d\"", "batch_max_wait"),
    ] {
        let (at, table) = anchor;
        let src = GOOD.replace(at, &format!("{at}{line}\n"));
        let e = parse(&src, "t.toml", &env).unwrap_err();
        assert_eq!(e.key, format!("{table}.{key}"), "{e}");
    }
    let src = GOOD.replace("[server]\n", "[server]\nshutdown_grace = \"400000h\"\n");
    let e = parse(&src, "t.toml", &env).unwrap_err();
    assert_eq!(e.key, "server.shutdown_grace", "{e}");
    let p = parse(GOOD, "t.toml", &env).unwrap();
    assert_eq!(p.server.max_connections, 10_000);
    assert_eq!(p.server.request_body_timeout, Duration::from_secs(60));
    assert_eq!(p.server.header_read_timeout, Duration::from_secs(30));
    assert_eq!(p.server.write_timeout, Duration::from_secs(60));
}

/// `cache_write_1h_input` defaults to `cache_write_input` (then to
/// `input`), and a table that does not set it keeps the price version it
/// had before the key existed; setting it changes the version.
#[test]
fn hour_long_cache_writes_default_to_the_cache_write_price() {
    let with = |extra: &str| {
        let src = GOOD.replace("output = \"8.00\"", &format!("output = \"8.00\"\n{extra}"));
        parse(&src, "t.toml", &env).unwrap()
    };
    let m = |p: &Policy| p.models["gpt-4.1"].clone();
    let bare = with("");
    assert_eq!(m(&bare).cache_write_1h_input, Decimal::from(2));
    let five = with("cache_write_input = \"2.50\"");
    assert_eq!(m(&five).cache_write_1h_input, Decimal::new(250, 2));
    let hour = with("cache_write_input = \"2.50\"\ncache_write_1h_input = \"4\"");
    assert_eq!(m(&hour).cache_write_1h_input, Decimal::from(4));
    assert_eq!(m(&hour).cache_write_input, Decimal::new(250, 2));
    // The digest this table had before the key existed.
    assert_eq!(bare.price_version, "sha256:05c48ae79b34");
    assert_ne!(hour.price_version, five.price_version);
    assert_eq!(
        hour.price_version,
        with("cache_write_1h_input = \"4\"\ncache_write_input = \"2.5\"").price_version
    );
}
