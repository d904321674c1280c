//! The config file as written: serde structs that mirror DESIGN §3 key for key.
//! Nothing here is trusted yet; `validate` turns it into a [`super::Policy`].

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub spool: RawSpool,
    #[serde(default)]
    pub tenancy: RawTenancy,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub pricing: RawPricing,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub sinks: Vec<RawSink>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    #[serde(default = "default_source")]
    pub source: String,
    #[serde(default)]
    pub admin_token_env: Option<String>,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
    #[serde(default = "default_request_body_timeout")]
    pub request_body_timeout: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: String,
    #[serde(default = "default_write_timeout")]
    pub write_timeout: String,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            max_request_bytes: default_max_request_bytes(),
            data_dir: default_data_dir(),
            source: default_source(),
            admin_token_env: None,
            shutdown_grace: default_shutdown_grace(),
            request_body_timeout: default_request_body_timeout(),
            max_connections: default_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            write_timeout: default_write_timeout(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8787".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:8788".into()
}
fn default_max_request_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_data_dir() -> String {
    "./data".into()
}
fn default_source() -> String {
    "tollgate".into()
}
fn default_shutdown_grace() -> String {
    "30s".into()
}
fn default_request_body_timeout() -> String {
    "60s".into()
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> String {
    "30s".into()
}
fn default_write_timeout() -> String {
    "60s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_when_full")]
    pub when_full: String,
    #[serde(default = "default_fsync")]
    pub fsync: String,
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval: String,
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
}

impl Default for RawSpool {
    fn default() -> Self {
        RawSpool {
            max_bytes: default_spool_max_bytes(),
            when_full: default_when_full(),
            fsync: default_fsync(),
            fsync_interval: default_fsync_interval(),
            segment_bytes: default_segment_bytes(),
        }
    }
}

fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_when_full() -> String {
    "reject".into()
}
fn default_fsync() -> String {
    "interval".into()
}
fn default_fsync_interval() -> String {
    "10ms".into()
}
fn default_segment_bytes() -> u64 {
    16 << 20
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenancy {
    #[serde(default = "default_tenancy_mode")]
    pub mode: String,
    #[serde(default = "default_tenancy_header")]
    pub header: String,
}

impl Default for RawTenancy {
    fn default() -> Self {
        RawTenancy {
            mode: default_tenancy_mode(),
            header: default_tenancy_header(),
        }
    }
}

fn default_tenancy_mode() -> String {
    "key".into()
}
fn default_tenancy_header() -> String {
    "x-tollgate-tenant".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    pub prefix: String,
    pub url: String,
    pub provider: String,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub api_key_header: Option<String>,
    #[serde(default = "default_upstream_timeout")]
    pub timeout: String,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    #[serde(default)]
    pub price_per_call: Option<Decimal>,
    #[serde(default)]
    pub unmetered_routes: Option<String>,
}

fn default_upstream_timeout() -> String {
    "600s".into()
}
fn default_connect_timeout() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub input: Decimal,
    #[serde(default)]
    pub cache_read_input: Option<Decimal>,
    #[serde(default)]
    pub cache_write_input: Option<Decimal>,
    #[serde(default)]
    pub cache_write_1h_input: Option<Decimal>,
    pub output: Decimal,
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u64,
}

fn default_max_output_tokens() -> u64 {
    4096
}

/// `[pricing]`: how prices are versioned and what an unpriced model does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default = "default_unknown_model")]
    pub unknown_model: String,
    #[serde(default = "default_url_item_tokens")]
    pub url_item_tokens: u64,
    #[serde(default = "default_stored_context_tokens")]
    pub stored_context_tokens: u64,
}

impl Default for RawPricing {
    fn default() -> Self {
        RawPricing {
            version: None,
            unknown_model: default_unknown_model(),
            url_item_tokens: default_url_item_tokens(),
            stored_context_tokens: default_stored_context_tokens(),
        }
    }
}

fn default_unknown_model() -> String {
    "allow".into()
}
fn default_url_item_tokens() -> u64 {
    2000
}
fn default_stored_context_tokens() -> u64 {
    128_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub budget: Option<RawBudget>,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub limit: Decimal,
    pub window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub batch_max_events: Option<usize>,
    #[serde(default)]
    pub batch_max_bytes: Option<usize>,
    #[serde(default)]
    pub batch_max_wait: Option<String>,
    #[serde(default)]
    pub gzip: Option<bool>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub tenant_attributes: Option<bool>,
}
