//! The `serve --config target.toml` model.
//!
//! ```toml
//! queue_depth = 128            # default 128
//! max_io_queues = 16           # default 16
//! in_capsule_data_size = 8192  # default 8192
//! cores = [0, 1]               # one poll group per core; default: one poll group
//! control_socket = "/run/nvmf-p2p.sock"
//!
//! [[listener]]
//! trtype = "rdma"
//! address = "192.168.100.1"
//! port = 4420                  # default 4420
//!
//! [[subsystem]]
//! nqn = "nqn.2026-11.io.nvmf-p2p:disk0"
//! serial = "NP0001"
//! model = "nvmf-p2p"
//! allow_any_host = false
//! hosts = ["nqn.2014-08.org.nvmexpress:uuid:..."]
//! [[subsystem.namespace]]
//! backend = "vfio:0000:01:00.0:1"   # or "spdk:0000:01:00.0:1", "file:/path", "ram:64MiB"
//! ```

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{Error, Result};
use crate::fabrics::DISCOVERY_NQN;

/// Default control socket path.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/nvmf-p2p/control.sock";
/// Default NVMe-oF RDMA port.
pub const DEFAULT_PORT: u16 = 4420;
/// Default queue depth (entries per queue).
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Default number of I/O queues a controller may create.
pub const DEFAULT_MAX_IO_QUEUES: u16 = 16;
/// Default in-capsule data size in bytes.
pub const DEFAULT_IN_CAPSULE_DATA_SIZE: u32 = 8192;
/// Default maximum data transfer size in bytes (MDTS), also the data buffer size.
pub const DEFAULT_MAX_IO_SIZE: u32 = 128 * 1024;
/// Default number of data buffers per poll group.
pub const DEFAULT_DATA_BUFFERS: u32 = 256;
/// Default time a connection has to send Connect (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 10_000;
/// Largest `max_io_size` accepted (bytes): every data buffer has this size.
pub const MAX_MAX_IO_SIZE: u32 = 1 << 20;
/// Largest `data_buffers` accepted (per poll group).
pub const MAX_DATA_BUFFERS: u32 = 16384;
/// Largest data pool of one poll group (`data_buffers × max_io_size`, bytes): pinned,
/// DMA-mapped and registered memory.
pub const MAX_POOL_BYTES: u64 = 1 << 30;

/// Whole target configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Entries per queue the target offers (CAP.MQES + 1, CM crqsize bound).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u16,
    /// Maximum I/O queues per controller.
    #[serde(default = "default_max_io_queues")]
    pub max_io_queues: u16,
    /// In-capsule data size in bytes (IOCCSZ = 4 + this / 16).
    #[serde(default = "default_icd")]
    pub in_capsule_data_size: u32,
    /// Maximum data transfer per command in bytes (MDTS); power of two, ≥ 4096.
    #[serde(default = "default_max_io_size")]
    pub max_io_size: u32,
    /// Data buffers (each `max_io_size` bytes) per poll group.
    #[serde(default = "default_data_buffers")]
    pub data_buffers: u32,
    /// How long a new connection may take to send its Connect command, in milliseconds;
    /// one that does not is dropped (logged, counted in `stats` as `connect_timeouts`).
    /// 0: never.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u32,
    /// CPU cores for poll groups (one poll group per entry); empty = one poll group, unpinned.
    #[serde(default)]
    pub cores: Vec<usize>,
    /// NVMe controllers of `vfio:` namespaces use shadow doorbells (Doorbell Buffer
    /// Config, fewer MMIO writes) when they offer them. Off: every doorbell is an MMIO
    /// write — what direct mode's P2P doorbell level needs on real hardware, where RDMA
    /// writes into the doorbell page bypass the shadow buffer.
    #[serde(default = "default_true")]
    pub shadow_doorbells: bool,
    /// Poll groups' NVMe queues (`vfio:` and `spdk:` namespaces) raise MSI-X interrupts
    /// through VFIO eventfds (ours, or DPDK's for SPDK's queue pairs), so a group with
    /// commands in the device sleeps until one completes. Off (or no MSI-X): polled
    /// queues, the group naps while commands are in the device.
    #[serde(default = "default_true")]
    pub nvme_interrupts: bool,
    /// Reactor: how long a poll group spins after its last work before it sleeps
    /// (microseconds).
    #[serde(default = "default_idle_spell_us")]
    pub idle_spell_us: u32,
    /// The same while its only outstanding work is in NVMe queues that raise interrupts
    /// (microseconds): shorter, the device takes far longer than a wake-up.
    #[serde(default = "default_device_spell_us")]
    pub device_spell_us: u32,
    /// Longest sleep of a poll group (milliseconds): keep-alive timers and stats run at
    /// least this often; every timeout wake-up of an idle target costs CPU.
    #[serde(default = "default_max_sleep_ms")]
    pub max_sleep_ms: u32,
    /// Control socket path used by `nvmf-p2p stats` / `ctl`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Group (name or numeric id) whose members may use the control socket too; unset:
    /// only the user `serve` runs as (the socket is mode 0600, other uids refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket_group: Option<String>,
    /// TCP port of direct mode's own RDMA CM listener (on the first listener's address),
    /// for firewalls; 0 (the default): a free port the kernel picks, which hosts learn
    /// from the attach descriptor.
    #[serde(default)]
    pub direct_port: u16,
    /// Prometheus metrics over HTTP (`GET /metrics`); off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// Listeners; each also serves the discovery subsystem.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// NVM subsystems.
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemConfig>,
}

/// The `[metrics]` table: an HTTP listener serving `nvmf-p2p stats --format prometheus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port, e.g. `127.0.0.1:9464`; a loopback address (the counters are not
    /// authenticated).
    pub listen: std::net::SocketAddr,
}

/// Transport type of a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrType {
    /// NVMe over RDMA (RoCE / iWARP / InfiniBand).
    #[default]
    Rdma,
}

/// One listen address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Transport type (default `rdma`, the only one).
    #[serde(default)]
    pub trtype: TrType,
    /// IP address to listen on.
    pub address: IpAddr,
    /// Port (trsvcid), default 4420.
    #[serde(default = "default_port")]
    pub port: u16,
}

/// One NVM subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number (≤ 20 ASCII characters).
    #[serde(default = "default_serial")]
    pub serial: String,
    /// Model number (≤ 40 ASCII characters).
    #[serde(default = "default_model")]
    pub model: String,
    /// Accept any host NQN.
    #[serde(default)]
    pub allow_any_host: bool,
    /// Allowed host NQNs (ignored when `allow_any_host`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Host NQNs allowed to attach direct-mode queues (`docs/direct-mode.md`); empty:
    /// direct mode off for this subsystem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub direct_hosts: Vec<String>,
    /// Namespaces, in nsid order unless `nsid` is given.
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

/// One namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Namespace id; default: position in the list + 1.
    #[serde(default)]
    pub nsid: Option<u32>,
    /// Backend specification.
    pub backend: BackendSpec,
}

/// Where a namespace's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A namespace of a PCIe NVMe controller driven by the `nvme` crate over VFIO.
    Vfio {
        /// PCI address `DDDD:BB:DD.F`.
        bdf: String,
        /// Namespace on that controller (default 1).
        nsid: u32,
    },
    /// A namespace of a PCIe NVMe controller driven by SPDK's NVMe driver (the binary's
    /// `spdk` feature; SPDK built by `scripts/setup`).
    Spdk {
        /// PCI address `DDDD:BB:DD.F`.
        bdf: String,
        /// Namespace on that controller (default 1).
        nsid: u32,
    },
    /// A regular file or block device.
    File {
        /// Path.
        path: PathBuf,
    },
    /// Memory, zero-filled.
    Ram {
        /// Size in bytes.
        size: u64,
    },
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Vfio { bdf, nsid } => write!(f, "vfio:{bdf}:{nsid}"),
            BackendSpec::Spdk { bdf, nsid } => write!(f, "spdk:{bdf}:{nsid}"),
            BackendSpec::File { path } => write!(f, "file:{}", path.display()),
            BackendSpec::Ram { size } => write!(f, "ram:{size}"),
        }
    }
}

fn bad(spec: &str, reason: &'static str) -> Error {
    Error::BackendSpec {
        spec: spec.to_owned(),
        reason,
    }
}

fn valid_bdf(s: &str) -> bool {
    // [DDDD:]BB:DD.F, hex digits.
    let (rest, func) = match s.rsplit_once('.') {
        Some(x) => x,
        None => return false,
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let ok_parts = match parts.as_slice() {
        [d, b, dev] => hex(d, 4) && hex(b, 2) && hex(dev, 2),
        [b, dev] => hex(b, 2) && hex(dev, 2),
        _ => false,
    };
    ok_parts && func.len() == 1 && matches!(func.as_bytes()[0], b'0'..=b'7')
}

/// `BDF[:nsid]` of a `vfio:` or `spdk:` backend (nsid 1 when left out).
fn parse_pci_namespace(spec: &str, rest: &str) -> Result<(String, u32)> {
    let (bdf, nsid) = match rest.rsplit_once(':') {
        Some((b, n)) if !n.contains('.') => {
            let nsid: u32 = n.parse().map_err(|_| bad(spec, "nsid is not a number"))?;
            (b, nsid)
        }
        _ => (rest, 1),
    };
    if !valid_bdf(bdf) {
        return Err(bad(spec, "PCI address must look like 0000:01:00.0"));
    }
    if nsid == 0 || nsid == u32::MAX {
        return Err(bad(spec, "nsid must be between 1 and 0xfffffffe"));
    }
    Ok((bdf.to_owned(), nsid))
}

/// Parses a size such as `4096`, `64M`, `64MiB`, `1G`, `512k` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl FromStr for BackendSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (kind, rest) = spec.split_once(':').ok_or_else(|| {
            bad(
                spec,
                "expected `vfio:BDF[:nsid]`, `spdk:BDF[:nsid]`, `file:PATH` or `ram:SIZE`",
            )
        })?;
        match kind {
            "vfio" => {
                let (bdf, nsid) = parse_pci_namespace(spec, rest)?;
                Ok(BackendSpec::Vfio { bdf, nsid })
            }
            "spdk" => {
                let (bdf, nsid) = parse_pci_namespace(spec, rest)?;
                Ok(BackendSpec::Spdk { bdf, nsid })
            }
            "file" => {
                if rest.is_empty() {
                    return Err(bad(spec, "empty path"));
                }
                Ok(BackendSpec::File {
                    path: PathBuf::from(rest),
                })
            }
            "ram" => {
                let size = parse_size(rest).ok_or_else(|| bad(spec, "size must be like 64MiB"))?;
                if size == 0 || !size.is_multiple_of(4096) {
                    return Err(bad(spec, "size must be a non-zero multiple of 4096"));
                }
                Ok(BackendSpec::Ram { size })
            }
            _ => Err(bad(spec, "unknown backend kind (vfio, spdk, file, ram)")),
        }
    }
}

impl Serialize for BackendSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_true() -> bool {
    true
}
fn default_queue_depth() -> u16 {
    DEFAULT_QUEUE_DEPTH
}
fn default_max_io_queues() -> u16 {
    DEFAULT_MAX_IO_QUEUES
}
fn default_icd() -> u32 {
    DEFAULT_IN_CAPSULE_DATA_SIZE
}
fn default_max_io_size() -> u32 {
    DEFAULT_MAX_IO_SIZE
}
fn default_data_buffers() -> u32 {
    DEFAULT_DATA_BUFFERS
}
fn default_connect_timeout_ms() -> u32 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_idle_spell_us() -> u32 {
    reactor_default().idle_spell.as_micros() as u32
}

fn default_device_spell_us() -> u32 {
    reactor_default().device_spell.as_micros() as u32
}

fn default_max_sleep_ms() -> u32 {
    reactor_default().max_sleep.as_millis() as u32
}

fn reactor_default() -> rdma::ReactorConfig {
    rdma::ReactorConfig::default()
}

/// Longest spell the reactor keys accept (µs): beyond it a poll group spins for a
/// tenth of a second after every burst.
pub const MAX_SPELL_US: u32 = 100_000;
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_serial() -> String {
    "NVMFP2P0000000000001".to_owned()
}
fn default_model() -> String {
    "nvmf-p2p".to_owned()
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_io_queues: DEFAULT_MAX_IO_QUEUES,
            in_capsule_data_size: DEFAULT_IN_CAPSULE_DATA_SIZE,
            max_io_size: DEFAULT_MAX_IO_SIZE,
            data_buffers: DEFAULT_DATA_BUFFERS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            cores: Vec::new(),
            idle_spell_us: default_idle_spell_us(),
            device_spell_us: default_device_spell_us(),
            max_sleep_ms: default_max_sleep_ms(),
            shadow_doorbells: true,
            nvme_interrupts: true,
            control_socket: default_control_socket(),
            control_socket_group: None,
            direct_port: 0,
            metrics: None,
            listeners: Vec::new(),
            subsystems: Vec::new(),
        }
    }
}

/// Where an invalid value sits in the source, for semantic checks after parsing.
///
/// Semantic checks run on a spanned shadow parse of the same text, so they can point at
/// the line of the offending value.
#[derive(Deserialize)]
struct SpannedShadow {
    #[serde(default)]
    queue_depth: Option<Spanned<toml::Value>>,
    #[serde(default)]
    max_io_queues: Option<Spanned<toml::Value>>,
    #[serde(default)]
    in_capsule_data_size: Option<Spanned<toml::Value>>,
    #[serde(default)]
    max_io_size: Option<Spanned<toml::Value>>,
    #[serde(default)]
    data_buffers: Option<Spanned<toml::Value>>,
    #[serde(default)]
    cores: Option<Spanned<toml::Value>>,
    #[serde(default)]
    idle_spell_us: Option<Spanned<toml::Value>>,
    #[serde(default)]
    device_spell_us: Option<Spanned<toml::Value>>,
    #[serde(default)]
    max_sleep_ms: Option<Spanned<toml::Value>>,
    #[serde(default)]
    metrics: Option<SpannedMetrics>,
    #[serde(default)]
    subsystem: Vec<SpannedSubsystem>,
}

#[derive(Deserialize)]
struct SpannedMetrics {
    listen: Spanned<toml::Value>,
}

#[derive(Deserialize)]
struct SpannedSubsystem {
    nqn: Spanned<String>,
    #[serde(default)]
    serial: Option<Spanned<String>>,
    #[serde(default)]
    model: Option<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    direct_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    namespace: Vec<SpannedNamespace>,
}

#[derive(Deserialize)]
struct SpannedNamespace {
    #[serde(default)]
    nsid: Option<Spanned<toml::Value>>,
    backend: Spanned<String>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Guesses the key whose value starts at `offset`: the text before `=` on that line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[start..end];
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}

/// The name of a `[name]` table header (single brackets) at or after `offset`'s line
/// start, when the span toml reports begins on one.
fn single_table_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?.trim();
    let name = line.strip_prefix('[')?.split(']').next()?.trim();
    (!line.starts_with("[[") && !name.is_empty()).then(|| name.to_owned())
}

impl TargetConfig {
    /// The reactor tuning of every poll group (`idle_spell_us`, `device_spell_us`,
    /// `max_sleep_ms`; the rest as `rdma::ReactorConfig::default`).
    pub fn reactor(&self) -> rdma::ReactorConfig {
        rdma::ReactorConfig {
            idle_spell: std::time::Duration::from_micros(u64::from(self.idle_spell_us)),
            device_spell: std::time::Duration::from_micros(u64::from(self.device_spell_us)),
            max_sleep: std::time::Duration::from_millis(u64::from(self.max_sleep_ms)),
            ..rdma::ReactorConfig::default()
        }
    }

    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `file` is used in error messages only.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let cfg: TargetConfig = toml::from_str(text).map_err(|e| {
            let (line, column, field_from_span) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (l, c, key_at(text, span.start))
                }
                None => (0, 0, None),
            };
            let mut message = e.message().trim().to_owned();
            // `[listener]` where `[[listener]]` is meant: toml points at the table.
            let table = e.span().and_then(|span| single_table_at(text, span.start));
            if let Some(t) = &table {
                if ["listener", "subsystem", "subsystem.namespace"].contains(&t.as_str()) {
                    message = format!("{message}: `{t}` is a list of tables, write [[{t}]]");
                }
            }
            let field = table
                .or_else(|| {
                    message
                        .split('`')
                        .nth(1)
                        .filter(|_| message.contains("field"))
                        .map(str::to_owned)
                        .or(field_from_span)
                })
                .unwrap_or_else(|| "<document>".to_owned());
            Error::Config {
                file: file.to_owned(),
                line,
                column,
                field,
                message,
            }
        })?;
        let shadow: SpannedShadow = toml::from_str(text).map_err(|e| Error::Config {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: "<document>".to_owned(),
            message: e.message().to_owned(),
        })?;
        cfg.validate(text, file, &shadow)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, file: &Path, sh: &SpannedShadow) -> Result<()> {
        let err = |span: Option<std::ops::Range<usize>>, field: String, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
            Error::Config {
                file: file.to_owned(),
                line,
                column,
                field,
                message,
            }
        };
        let sp = |v: &Option<Spanned<toml::Value>>| v.as_ref().map(|v| v.span());
        if !(2..=4096).contains(&self.queue_depth) {
            return Err(err(
                sp(&sh.queue_depth),
                "queue_depth".into(),
                "must be between 2 and 4096".into(),
            ));
        }
        if self.max_io_queues == 0 {
            return Err(err(
                sp(&sh.max_io_queues),
                "max_io_queues".into(),
                "must be ≥ 1".into(),
            ));
        }
        if !self.in_capsule_data_size.is_multiple_of(16) || self.in_capsule_data_size > 64 * 1024 {
            return Err(err(
                sp(&sh.in_capsule_data_size),
                "in_capsule_data_size".into(),
                "must be a multiple of 16 and at most 65536".into(),
            ));
        }
        if !self.max_io_size.is_power_of_two() || self.max_io_size < 4096 {
            return Err(err(
                sp(&sh.max_io_size),
                "max_io_size".into(),
                "must be a power of two ≥ 4096".into(),
            ));
        }
        if self.max_io_size > MAX_MAX_IO_SIZE {
            return Err(err(
                sp(&sh.max_io_size),
                "max_io_size".into(),
                format!(
                    "must be at most {MAX_MAX_IO_SIZE} (1 MiB): every data buffer has this size"
                ),
            ));
        }
        if self.data_buffers == 0 || self.data_buffers > MAX_DATA_BUFFERS {
            return Err(err(
                sp(&sh.data_buffers),
                "data_buffers".into(),
                format!("must be between 1 and {MAX_DATA_BUFFERS}"),
            ));
        }
        let pool = u64::from(self.data_buffers) * u64::from(self.max_io_size);
        if pool > MAX_POOL_BYTES {
            return Err(err(
                sp(&sh.data_buffers).or(sp(&sh.max_io_size)),
                "data_buffers".into(),
                format!(
                    "data_buffers × max_io_size is {} MiB per poll group, the limit is {} MiB of pinned memory: lower one of them",
                    pool >> 20,
                    MAX_POOL_BYTES >> 20
                ),
            ));
        }
        for (v, span, field) in [
            (self.idle_spell_us, &sh.idle_spell_us, "idle_spell_us"),
            (self.device_spell_us, &sh.device_spell_us, "device_spell_us"),
        ] {
            if v > MAX_SPELL_US {
                return Err(err(
                    sp(span),
                    field.into(),
                    format!("must be at most {MAX_SPELL_US} µs"),
                ));
            }
        }
        if !(1..=1000).contains(&self.max_sleep_ms) {
            return Err(err(
                sp(&sh.max_sleep_ms),
                "max_sleep_ms".into(),
                "must be between 1 and 1000".into(),
            ));
        }
        if let Some(m) = &self.metrics {
            if !m.listen.ip().is_loopback() {
                return Err(err(
                    sh.metrics.as_ref().map(|m| m.listen.span()),
                    "metrics.listen".into(),
                    format!(
                        "{} is not a loopback address: the metrics endpoint has no authentication, serve it on 127.0.0.1 or ::1",
                        m.listen
                    ),
                ));
            }
        }
        let mut nqns: Vec<&str> = Vec::new();
        for (i, (s, ss)) in self.subsystems.iter().zip(&sh.subsystem).enumerate() {
            let at = |f: &str| format!("subsystem[{i}].{f}");
            if let Err(m) = check_nqn(&s.nqn) {
                return Err(err(Some(ss.nqn.span()), at("nqn"), m));
            }
            if s.nqn == DISCOVERY_NQN {
                return Err(err(
                    Some(ss.nqn.span()),
                    at("nqn"),
                    "the discovery NQN is reserved".into(),
                ));
            }
            if nqns.contains(&s.nqn.as_str()) {
                return Err(err(
                    Some(ss.nqn.span()),
                    at("nqn"),
                    "duplicate subsystem NQN".into(),
                ));
            }
            nqns.push(&s.nqn);
            if s.serial.len() > 20 || !s.serial.is_ascii() {
                let span = ss.serial.as_ref().map(|v| v.span());
                return Err(err(
                    span,
                    at("serial"),
                    "at most 20 ASCII characters".into(),
                ));
            }
            if s.model.len() > 40 || !s.model.is_ascii() {
                let span = ss.model.as_ref().map(|v| v.span());
                return Err(err(span, at("model"), "at most 40 ASCII characters".into()));
            }
            for (j, (h, hs)) in s.hosts.iter().zip(&ss.hosts).enumerate() {
                if let Err(m) = check_nqn(h) {
                    return Err(err(Some(hs.span()), at(&format!("hosts[{j}]")), m));
                }
            }
            for (j, (h, hs)) in s.direct_hosts.iter().zip(&ss.direct_hosts).enumerate() {
                let field = at(&format!("direct_hosts[{j}]"));
                if let Err(m) = check_nqn(h) {
                    return Err(err(Some(hs.span()), field, m));
                }
                // A direct host connects an admin queue first, like any host.
                if !s.allow_any_host && !s.hosts.contains(h) {
                    return Err(err(
                        Some(hs.span()),
                        field,
                        format!("{h} is not on hosts: a direct host must also be allowed to connect (add it to hosts, or set allow_any_host = true)"),
                    ));
                }
            }
            if !s.allow_any_host && s.hosts.is_empty() {
                return Err(err(
                    Some(ss.nqn.span()),
                    at("hosts"),
                    "no host may connect: list hosts or set allow_any_host = true".into(),
                ));
            }
            let mut ids: Vec<u32> = Vec::new();
            for (j, (n, ns)) in s.namespaces.iter().zip(&ss.namespace).enumerate() {
                let nsid = n.nsid.unwrap_or(j as u32 + 1);
                let span = ns
                    .nsid
                    .as_ref()
                    .map(|v| v.span())
                    .or(Some(ns.backend.span()));
                if nsid == 0 || nsid == u32::MAX {
                    return Err(err(
                        span,
                        at(&format!("namespace[{j}].nsid")),
                        "must be between 1 and 0xfffffffe".into(),
                    ));
                }
                if ids.contains(&nsid) {
                    return Err(err(
                        span,
                        at(&format!("namespace[{j}].nsid")),
                        format!("duplicate nsid {nsid}"),
                    ));
                }
                ids.push(nsid);
            }
        }
        Ok(())
    }

    /// The checks `serve` makes beyond the file's own consistency, against this machine:
    /// a listener is configured, every core of `cores` exists (`cpus` online CPUs), every
    /// `vfio:`/`spdk:` PCI address names a device (`pci_exists`). `text` is the file's
    /// content (for line numbers), `file` its name in messages. `serve --print-config`
    /// runs them too.
    pub fn check_deploy(
        &self,
        text: &str,
        file: &Path,
        cpus: usize,
        pci_exists: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        let shadow: SpannedShadow = toml::from_str(text).map_err(|e| Error::Config {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: "<document>".to_owned(),
            message: e.message().to_owned(),
        })?;
        let err = |span: Option<std::ops::Range<usize>>, field: String, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
            Error::Config {
                file: file.to_owned(),
                line,
                column,
                field,
                message,
            }
        };
        if self.listeners.is_empty() {
            return Err(err(
                None,
                "listener".into(),
                "no [[listener]]: add one with the RDMA address to serve on".into(),
            ));
        }
        let cores_span = shadow.cores.as_ref().map(|c| c.span());
        for (i, &c) in self.cores.iter().enumerate() {
            if c >= cpus {
                return Err(err(
                    cores_span.clone(),
                    format!("cores[{i}]"),
                    format!(
                        "core {c} does not exist: this machine has {cpus} CPUs (0..={})",
                        cpus.saturating_sub(1)
                    ),
                ));
            }
            if self.cores[..i].contains(&c) {
                return Err(err(
                    cores_span.clone(),
                    format!("cores[{i}]"),
                    format!("core {c} is listed twice (one poll group per core)"),
                ));
            }
        }
        for (i, (s, ss)) in self.subsystems.iter().zip(&shadow.subsystem).enumerate() {
            for (j, (n, ns)) in s.namespaces.iter().zip(&ss.namespace).enumerate() {
                if let BackendSpec::Vfio { bdf, .. } | BackendSpec::Spdk { bdf, .. } = &n.backend {
                    if !pci_exists(bdf) {
                        return Err(err(
                            Some(ns.backend.span()),
                            format!("subsystem[{i}].namespace[{j}].backend"),
                            format!("no PCI device {bdf} on this machine (see lspci -D)"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Validates a configuration built in memory (a `ctl` request applied to the running
    /// one) with exactly the checks of a configuration file: it is printed as TOML and
    /// parsed back through [`TargetConfig::parse`]. The error names the field.
    pub fn check(&self, origin: &str) -> Result<()> {
        let text = self.to_toml();
        match Self::parse(&text, Path::new(origin)) {
            Ok(_) => Ok(()),
            Err(Error::Config {
                file,
                field,
                message,
                ..
            }) => Err(Error::Config {
                file,
                line: 0,
                column: 0,
                field,
                message,
            }),
            Err(e) => Err(e),
        }
    }

    /// Namespace ids in effect for a subsystem (explicit, or position + 1).
    pub fn nsids(sub: &SubsystemConfig) -> impl Iterator<Item = (u32, &NamespaceConfig)> {
        sub.namespaces
            .iter()
            .enumerate()
            .map(|(i, n)| (n.nsid.unwrap_or(i as u32 + 1), n))
    }

    /// The effective configuration as TOML (for `--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot serialize: {e}\n"))
    }
}

/// The annotated template `serve --print-config` prints without `--config`: every key
/// with its default (commented out where there is no default to show), parsed by the
/// tests so it cannot drift from the model. It is `packaging/target.toml`, which the
/// Debian package installs as `/etc/nvmf-p2p/target.toml`.
pub const TEMPLATE: &str = include_str!("../../packaging/target.toml");

/// Checks an NQN's shape: `nqn.yyyy-mm.reverse-domain:...` or the UUID form, ≤ 223 bytes.
pub fn check_nqn(nqn: &str) -> std::result::Result<(), String> {
    if nqn.len() > 223 {
        return Err(format!("NQN is {} bytes, the limit is 223", nqn.len()));
    }
    if !nqn.is_ascii() || nqn.bytes().any(|b| b == 0 || b.is_ascii_whitespace()) {
        return Err("NQN must be printable ASCII without spaces".into());
    }
    let b = nqn.as_bytes();
    let dated = b.len() > 12
        && nqn.starts_with("nqn.")
        && b[4..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..11].iter().all(u8::is_ascii_digit)
        && b[11] == b'.';
    if !dated {
        return Err("NQN must start with `nqn.yyyy-mm.`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cores = [0]

[[listener]]
trtype = "rdma"
address = "10.0.0.1"

[[subsystem]]
nqn = "nqn.2026-11.io.nvmf-p2p:disk0"
hosts = ["nqn.2014-08.org.nvmexpress:uuid:1111"]
[[subsystem.namespace]]
backend = "ram:64MiB"
[[subsystem.namespace]]
nsid = 5
backend = "vfio:0000:01:00.0:2"
[[subsystem.namespace]]
backend = "file:/tmp/disk.img"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = TargetConfig::parse(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(c.queue_depth, 128);
        assert_eq!(c.in_capsule_data_size, 8192);
        assert_eq!(c.listeners[0].port, 4420);
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        let s = &c.subsystems[0];
        assert_eq!(s.namespaces[0].backend, BackendSpec::Ram { size: 64 << 20 });
        assert_eq!(
            s.namespaces[1].backend,
            BackendSpec::Vfio {
                bdf: "0000:01:00.0".into(),
                nsid: 2
            }
        );
        let ids: Vec<u32> = TargetConfig::nsids(s).map(|(i, _)| i).collect();
        assert_eq!(ids, [1, 5, 3]);
    }

    #[test]
    fn print_config_round_trips() {
        let c = TargetConfig::parse(GOOD, Path::new("t.toml")).unwrap();
        let text = c.to_toml();
        let again = TargetConfig::parse(&text, Path::new("printed")).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn backend_specs() {
        assert_eq!(
            "vfio:01:00.0".parse::<BackendSpec>().unwrap(),
            BackendSpec::Vfio {
                bdf: "01:00.0".into(),
                nsid: 1
            }
        );
        assert!("vfio:0000:01:00".parse::<BackendSpec>().is_err());
        assert_eq!(
            "spdk:0000:01:00.0:2".parse::<BackendSpec>().unwrap(),
            BackendSpec::Spdk {
                bdf: "0000:01:00.0".into(),
                nsid: 2
            }
        );
        assert_eq!(
            "spdk:0000:01:00.0"
                .parse::<BackendSpec>()
                .unwrap()
                .to_string(),
            "spdk:0000:01:00.0:1"
        );
        assert!("spdk:01:00".parse::<BackendSpec>().is_err());
        assert!("spdk:0000:01:00.0:x".parse::<BackendSpec>().is_err());
        assert!("vfio:0000:01:00.0:0".parse::<BackendSpec>().is_err());
        assert!("ram:12".parse::<BackendSpec>().is_err());
        assert!("ram:lots".parse::<BackendSpec>().is_err());
        assert!("nbd:foo".parse::<BackendSpec>().is_err());
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4k"), Some(4096));
    }

    fn config_err(text: &str) -> (usize, String, String) {
        match TargetConfig::parse(text, Path::new("bad.toml")).unwrap_err() {
            Error::Config {
                file,
                line,
                field,
                message,
                ..
            } => {
                assert_eq!(file, Path::new("bad.toml"));
                (line, field, message)
            }
            e => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn type_error_names_line_and_field() {
        let (line, field, _) = config_err("queue_depth = 128\nmax_io_queues = \"many\"\n");
        assert_eq!((line, field.as_str()), (2, "max_io_queues"));
    }

    #[test]
    fn bad_backend_names_line_and_field() {
        let text = GOOD.replace("ram:64MiB", "ram:lots");
        let (line, field, msg) = config_err(&text);
        assert_eq!(line, 12, "{msg}");
        assert_eq!(field, "backend");
        assert!(msg.contains("ram:lots"), "{msg}");
    }

    #[test]
    fn nvme_switches_default_on_and_bad_values_name_the_line() {
        let cfg = TargetConfig::parse("", Path::new("t.toml")).unwrap();
        assert!(cfg.shadow_doorbells && cfg.nvme_interrupts);
        let cfg = TargetConfig::parse(
            "shadow_doorbells = false\nnvme_interrupts = false\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!cfg.shadow_doorbells && !cfg.nvme_interrupts);
        let again = TargetConfig::parse(&cfg.to_toml(), Path::new("t.toml")).unwrap();
        assert_eq!(again, cfg);
        let (line, field, msg) = config_err("queue_depth = 64\nshadow_doorbells = \"off\"\n");
        assert_eq!((line, field.as_str()), (2, "shadow_doorbells"), "{msg}");
        let (line, field, _) = config_err("\n\nnvme_interrupts = 1\n");
        assert_eq!((line, field.as_str()), (3, "nvme_interrupts"));
    }

    #[test]
    fn missing_field_is_named() {
        let (_, field, _) = config_err("[[subsystem]]\nserial = \"x\"\n");
        assert_eq!(field, "nqn");
    }

    #[test]
    fn semantic_errors_point_at_value() {
        let text = GOOD.replace("nsid = 5", "nsid = 1");
        let (line, field, msg) = config_err(&text);
        assert_eq!(
            (line, field.as_str()),
            (14, "subsystem[0].namespace[1].nsid"),
            "{msg}"
        );
        let (line, field, _) = config_err("queue_depth = 1\n");
        assert_eq!((line, field.as_str()), (1, "queue_depth"));
        let text = GOOD.replace("nqn.2014-08.org.nvmexpress:uuid:1111", "bogus");
        let (line, field, _) = config_err(&text);
        assert_eq!((line, field.as_str()), (10, "subsystem[0].hosts[0]"));
        let text = GOOD.replace("cores", "colors");
        let (line, field, _) = config_err(&text);
        assert_eq!(line, 2);
        assert_eq!(field, "colors");
    }

    #[test]
    fn template_parses_with_the_defaults_and_names_every_key() {
        let c = TargetConfig::parse(TEMPLATE, Path::new("template")).unwrap();
        let d = TargetConfig::default();
        assert_eq!(
            (c.queue_depth, c.max_io_queues, c.in_capsule_data_size),
            (d.queue_depth, d.max_io_queues, d.in_capsule_data_size)
        );
        assert_eq!(
            (c.max_io_size, c.data_buffers),
            (d.max_io_size, d.data_buffers)
        );
        assert_eq!(
            (c.cores.clone(), c.control_socket.clone()),
            (d.cores, d.control_socket)
        );
        assert_eq!((c.shadow_doorbells, c.nvme_interrupts), (true, true));
        assert_eq!((c.direct_port, c.metrics.clone()), (0, None));
        assert_eq!(c.listeners[0].port, DEFAULT_PORT);
        let s = &c.subsystems[0];
        assert_eq!(
            (s.serial.clone(), s.model.clone()),
            (default_serial(), default_model())
        );
        c.check_deploy(TEMPLATE, Path::new("template"), 1, &|_| true)
            .unwrap();
        // Every key the model serializes (with the optional ones filled in) is in the
        // template, so a new key cannot be left out of it.
        let mut full = c.clone();
        full.metrics = Some(MetricsConfig {
            listen: "127.0.0.1:9464".parse().unwrap(),
        });
        full.control_socket_group = Some("nvmf-p2p".into());
        full.subsystems[0].direct_hosts = full.subsystems[0].hosts.clone();
        full.subsystems[0].namespaces[0].nsid = Some(1);
        for line in full.to_toml().lines() {
            if let Some((key, _)) = line.split_once(" = ") {
                let key = key.trim();
                assert!(
                    TEMPLATE.lines().any(|l| l
                        .trim_start_matches(['#', ' '])
                        .starts_with(&format!("{key} ="))),
                    "key {key} missing from TEMPLATE"
                );
            }
        }
    }

    #[test]
    fn single_bracket_list_table_names_field_and_line() {
        let (line, field, msg) =
            config_err("queue_depth = 64\n[listener]\naddress = \"10.0.0.1\"\n");
        assert_eq!((line, field.as_str()), (2, "listener"), "{msg}");
        assert!(msg.contains("[[listener]]"), "{msg}");
        let (_, field, msg) = config_err("[subsystem]\nnqn = \"nqn.2026-11.io.x:a\"\n");
        assert_eq!(field, "subsystem", "{msg}");
    }

    #[test]
    fn trtype_defaults_to_rdma() {
        let c =
            TargetConfig::parse("[[listener]]\naddress = \"10.0.0.1\"\n", Path::new("t")).unwrap();
        assert_eq!(c.listeners[0].trtype, TrType::Rdma);
    }

    #[test]
    fn buffer_bounds_name_the_field() {
        let (line, field, msg) = config_err("\nmax_io_size = 2097152\n");
        assert_eq!((line, field.as_str()), (2, "max_io_size"), "{msg}");
        let (_, field, msg) = config_err("data_buffers = 100000\n");
        assert_eq!(field, "data_buffers", "{msg}");
        let (_, field, msg) = config_err("max_io_size = 1048576\ndata_buffers = 2048\n");
        assert_eq!(field, "data_buffers", "{msg}");
        assert!(msg.contains("2048 MiB"), "{msg}");
        TargetConfig::parse(
            "max_io_size = 1048576\ndata_buffers = 1024\n",
            Path::new("t"),
        )
        .unwrap();
    }

    #[test]
    fn direct_host_must_be_allowed_to_connect() {
        let text = GOOD.replace(
            "hosts = [\"nqn.2014-08.org.nvmexpress:uuid:1111\"]",
            "hosts = [\"nqn.2014-08.org.nvmexpress:uuid:1111\"]\ndirect_hosts = [\"nqn.2014-08.org.nvmexpress:uuid:2222\"]",
        );
        let (line, field, msg) = config_err(&text);
        assert_eq!(
            (line, field.as_str()),
            (11, "subsystem[0].direct_hosts[0]"),
            "{msg}"
        );
        assert!(msg.contains("not on hosts"), "{msg}");
        let ok = text.replace("uuid:2222", "uuid:1111");
        TargetConfig::parse(&ok, Path::new("t")).unwrap();
        let any = text.replace(
            "hosts = [\"nqn.2014-08.org.nvmexpress:uuid:1111\"]\n",
            "allow_any_host = true\n",
        );
        TargetConfig::parse(&any, Path::new("t")).unwrap();
    }

    #[test]
    fn reactor_keys_become_the_reactor_config_and_are_bounded() {
        let c = TargetConfig::parse(
            "idle_spell_us = 50\ndevice_spell_us = 5\nmax_sleep_ms = 20\n",
            Path::new("t"),
        )
        .unwrap();
        let r = c.reactor();
        assert_eq!(
            (r.idle_spell, r.device_spell, r.max_sleep),
            (
                std::time::Duration::from_micros(50),
                std::time::Duration::from_micros(5),
                std::time::Duration::from_millis(20)
            )
        );
        assert_eq!(
            TargetConfig::default().reactor(),
            rdma::ReactorConfig::default()
        );
        let (line, field, msg) = config_err("queue_depth = 64\nidle_spell_us = 200000\n");
        assert_eq!((line, field.as_str()), (2, "idle_spell_us"), "{msg}");
        let (line, field, msg) = config_err("max_sleep_ms = 0\n");
        assert_eq!((line, field.as_str()), (1, "max_sleep_ms"), "{msg}");
    }

    #[test]
    fn metrics_only_on_loopback() {
        let c = TargetConfig::parse("[metrics]\nlisten = \"127.0.0.1:9464\"\n", Path::new("t"))
            .unwrap();
        assert_eq!(c.metrics.unwrap().listen.port(), 9464);
        let (line, field, msg) = config_err("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
        assert_eq!((line, field.as_str()), (2, "metrics.listen"), "{msg}");
    }

    #[test]
    fn deploy_checks_listener_cores_and_devices() {
        let check = |text: &str, cpus: usize| {
            let c = TargetConfig::parse(text, Path::new("d.toml")).unwrap();
            match c.check_deploy(text, Path::new("d.toml"), cpus, &|b| b == "0000:01:00.0") {
                Ok(()) => None,
                Err(Error::Config {
                    line,
                    field,
                    message,
                    ..
                }) => Some((line, field, message)),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(check(GOOD, 2), None);
        let (_, field, msg) = check("queue_depth = 64\n", 2).unwrap();
        assert_eq!(field, "listener", "{msg}");
        let (line, field, msg) = check(&GOOD.replace("cores = [0]", "cores = [0, 99]"), 2).unwrap();
        assert_eq!((line, field.as_str()), (2, "cores[1]"), "{msg}");
        assert!(msg.contains("2 CPUs"), "{msg}");
        let (_, field, _) = check(&GOOD.replace("cores = [0]", "cores = [1, 1]"), 2).unwrap();
        assert_eq!(field, "cores[1]");
        let (line, field, msg) =
            check(&GOOD.replace("0000:01:00.0:2", "0000:02:00.0:2"), 2).unwrap();
        assert_eq!(
            (line, field.as_str()),
            (15, "subsystem[0].namespace[1].backend"),
            "{msg}"
        );
        assert!(msg.contains("0000:02:00.0"), "{msg}");
    }
}
