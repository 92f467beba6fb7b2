//! qemu-ga 7.2's command line and key-file config: the same options
//! (getopt style: `-pPATH`, `-p PATH`, `--path=PATH`, `--path PATH`,
//! `-F` with an optional attached argument), the `[general]` group of one
//! key file read first (`-c`, else `$QGA_CONF`, else
//! /etc/qemu/qemu-ga.conf: with `$QGA_CONF` set the default file is not
//! read, as in qemu-ga 7.2), the command line winning, and `-D` printing
//! the effective config.
//!
//! Arguments are bytes, as for getopt: paths (`-p`, `-l`, `-f`, `-t`, `-F`,
//! `-c`, `$QGA_CONF`) and the other values need not be UTF-8 and are kept
//! as given (`-D` prints them unchanged, as qemu-ga).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::channel::{ISA_SERIAL_PATH, Method, VIRTIO_SERIAL_PATH};

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/qemu/qemu-ga.conf";
/// Default fsfreeze hook (for a bare `-F`).
pub const DEFAULT_HOOK: &str = "/etc/qemu/fsfreeze-hook";

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `-d`
    pub daemonize: bool,
    /// `-m` (a name that is not UTF-8 is no method: it fails when the
    /// channel opens, as in qemu-ga)
    pub method: OsString,
    /// `-p`
    pub path: Option<PathBuf>,
    /// `-l`
    pub logfile: Option<PathBuf>,
    /// `-f`
    pub pidfile: PathBuf,
    /// `-F`
    pub fsfreeze_hook: Option<PathBuf>,
    /// `-t`
    pub statedir: PathBuf,
    /// `-v`
    pub verbose: bool,
    /// `-r`
    pub retry_path: bool,
    /// `-b` (accumulated; a name that is not UTF-8 names no command)
    pub block_rpcs: Vec<OsString>,
    /// `-a` (accumulated; a later qemu-ga option)
    pub allow_rpcs: Vec<OsString>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            daemonize: false,
            method: "virtio-serial".into(),
            path: None,
            logfile: None,
            pidfile: "/var/run/qemu-ga.pid".into(),
            fsfreeze_hook: None,
            statedir: "/var/run".into(),
            verbose: false,
            retry_path: false,
            block_rpcs: Vec::new(),
            allow_rpcs: Vec::new(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Run the agent.
    Run(Config),
    /// Print the config (`-D`).
    Dump(Config),
    /// Print the version (`-V`).
    Version,
    /// Print help (`-h`).
    Help,
    /// List the RPC names (`-b help`).
    ListRpcs,
}

/// Command-line and config errors (exit status 1, as qemu-ga).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An unknown option (getopt's complaint, without the program name).
    #[error("{0}")]
    Unknown(String),
    /// An option without its argument.
    #[error("option '{0}' requires an argument")]
    MissingArgument(String),
    /// The config file could not be read or parsed.
    #[error("failed to load config file {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

const WITH_ARG: &[(u8, &str)] = &[
    (b'm', "method"),
    (b'p', "path"),
    (b'l', "logfile"),
    (b'f', "pidfile"),
    (b't', "statedir"),
    (b'b', "block-rpcs"),
    (b'a', "allow-rpcs"),
    (b'c', "config"),
    (b's', "service"),
];
const NO_ARG: &[(u8, &str)] = &[
    (b'h', "help"),
    (b'V', "version"),
    (b'v', "verbose"),
    (b'd', "daemonize"),
    (b'D', "dump-conf"),
    (b'r', "retry-path"),
];

/// qemu-ga's `split_list`: the items in reverse order (it prepends each
/// to a GList), which `-D` and the order of disabling show.
fn split_list(s: &[u8]) -> impl Iterator<Item = OsString> + '_ {
    s.rsplit(|&b| b == b',')
        .filter(|x| !x.is_empty())
        .map(|x| OsStr::from_bytes(x).to_owned())
}

/// Bytes as an `OsString`.
fn os(bytes: &[u8]) -> OsString {
    OsStr::from_bytes(bytes).to_owned()
}

/// Bytes for an error message (not UTF-8: replacement characters).
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Applies the `[general]` group of a key file to `cfg`.
fn apply_keyfile(cfg: &mut Config, text: &str, path: &str) -> Result<(), CliError> {
    let mut group = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(g) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            group = g.to_owned();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(CliError::Config {
                path: path.into(),
                reason: format!("line {} is not a group, comment or key=value", n + 1),
            });
        };
        if group != "general" {
            continue;
        }
        let (key, value) = (key.trim(), value.trim());
        // g_key_file_get_boolean: only true/false/1/0; anything else
        // (`yes`, `TRUE`) is a fatal config error in qemu-ga.
        let flag = |v: &str| match v {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(CliError::Config {
                path: path.into(),
                reason: format!(
                    "Key file contains key \u{201c}{key}\u{201d} which has a value that cannot be interpreted."
                ),
            }),
        };
        match key {
            "daemon" => cfg.daemonize = flag(value)?,
            "method" => cfg.method = value.into(),
            "path" => cfg.path = Some(value.into()),
            "logfile" => cfg.logfile = Some(value.into()),
            "pidfile" => cfg.pidfile = value.into(),
            "fsfreeze-hook" => cfg.fsfreeze_hook = Some(value.into()),
            "statedir" => cfg.statedir = value.into(),
            "verbose" => cfg.verbose = flag(value)?,
            "retry-path" => cfg.retry_path = flag(value)?,
            // As qemu-ga 7.2: one raw string split on commas.
            "block-rpcs" | "blacklist" => cfg.block_rpcs = split_list(value.as_bytes()).collect(),
            "allow-rpcs" => cfg.allow_rpcs = split_list(value.as_bytes()).collect(),
            _ => {}
        }
    }
    Ok(())
}

/// Parses `args` (without argv[0]); `conf_env` is `$QGA_CONF`.
pub fn parse(args: &[OsString], conf_env: Option<OsString>) -> Result<Action, CliError> {
    // Options in order, long names normalised to their short letter.
    let mut opts: Vec<(u8, Option<OsString>)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_bytes();
        i += 1;
        if a == b"--" {
            // getopt: the rest are operands, which qemu-ga ignores.
            break;
        }
        if let Some(long) = a.strip_prefix(b"--") {
            let (name, inline) = match long.iter().position(|&b| b == b'=') {
                Some(k) => (&long[..k], Some(os(&long[k + 1..]))),
                None => (long, None),
            };
            let name: &[u8] = if name == b"blacklist" {
                b"block-rpcs"
            } else {
                name
            };
            if name == b"fsfreeze-hook" {
                opts.push((b'F', inline));
            } else if let Some(&(c, _)) = WITH_ARG.iter().find(|(_, l)| l.as_bytes() == name) {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .cloned()
                            .ok_or_else(|| CliError::MissingArgument(lossy(a)))?;
                        i += 1;
                        v
                    }
                };
                opts.push((c, Some(v)));
            } else if let Some(&(c, _)) = NO_ARG.iter().find(|(_, l)| l.as_bytes() == name) {
                if inline.is_some() {
                    return Err(CliError::Unknown(format!(
                        "option '--{}' doesn't allow an argument",
                        lossy(name)
                    )));
                }
                opts.push((c, None));
            } else {
                return Err(CliError::Unknown(format!(
                    "unrecognized option '{}'",
                    lossy(a)
                )));
            }
        } else if let Some(short) = a.strip_prefix(b"-").filter(|s| !s.is_empty()) {
            // getopt reads short options byte by byte.
            let mut j = 0;
            while j < short.len() {
                let c = short[j];
                j += 1;
                let rest = &short[j..];
                if c == b'F' {
                    opts.push((b'F', (!rest.is_empty()).then(|| os(rest))));
                    break;
                } else if WITH_ARG.iter().any(|(s, _)| *s == c) {
                    let v = if !rest.is_empty() {
                        os(rest)
                    } else {
                        let v = args.get(i).cloned().ok_or_else(|| {
                            CliError::MissingArgument(format!("-{}", char::from(c)))
                        })?;
                        i += 1;
                        v
                    };
                    opts.push((c, Some(v)));
                    break;
                } else if NO_ARG.iter().any(|(s, _)| *s == c) {
                    opts.push((c, None));
                } else {
                    return Err(CliError::Unknown(format!(
                        "invalid option -- '{}'",
                        lossy(&[c])
                    )));
                }
            }
        }
        // A non-option argument: getopt_long moves it to the end and
        // qemu-ga ignores it.
    }
    let mut cfg = Config::default();
    let explicit = opts
        .iter()
        .rev()
        .find(|(c, _)| *c == b'c')
        .and_then(|(_, v)| v.clone());
    // -c, else $QGA_CONF, else the default: only one file is read.
    let conf = explicit
        .clone()
        .or(conf_env)
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
    let conf_name = conf.to_string_lossy();
    match std::fs::read_to_string(&conf) {
        Ok(text) => apply_keyfile(&mut cfg, &text, &conf_name)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {}
        Err(e) => {
            return Err(CliError::Config {
                path: conf_name.into_owned(),
                reason: e.to_string(),
            });
        }
    }
    let mut action = None;
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        let is_help = v.as_bytes() == b"help" || v.as_bytes() == b"?";
        match c {
            b'm' => cfg.method = v,
            b'p' => cfg.path = Some(v.into()),
            b'l' => cfg.logfile = Some(v.into()),
            b'f' => cfg.pidfile = v.into(),
            b't' => cfg.statedir = v.into(),
            b'F' => {
                cfg.fsfreeze_hook = Some(if v.is_empty() {
                    DEFAULT_HOOK.into()
                } else {
                    v.into()
                })
            }
            b'b' | b'a' if is_help => return Ok(Action::ListRpcs),
            b'b' => cfg.block_rpcs.extend(split_list(v.as_bytes())),
            b'a' => cfg.allow_rpcs.extend(split_list(v.as_bytes())),
            b'v' => cfg.verbose = true,
            b'd' => cfg.daemonize = true,
            b'r' => cfg.retry_path = true,
            b'D' => action = Some(b'D'),
            b'V' => return Ok(Action::Version),
            b'h' => return Ok(Action::Help),
            _ => {}
        }
    }
    if action == Some(b'D') {
        return Ok(Action::Dump(cfg));
    }
    Ok(Action::Run(cfg))
}

impl CliError {
    /// Whether this is a usage error (getopt's '?'), which qemu-ga answers
    /// with its "Unknown option" line on stdout.
    pub fn is_usage(&self) -> bool {
        matches!(self, CliError::Unknown(_) | CliError::MissingArgument(_))
    }
}

/// qemu-ga's answer on stdout to a usage error, `argv0` as invoked.
pub fn usage_hint(argv0: &str) -> String {
    format!("Unknown option, try '{argv0} --help' for more information.\n")
}

impl Config {
    /// The transport, if `-m` names one.
    pub fn method(&self) -> Option<Method> {
        Method::parse(self.method.to_str()?)
    }

    /// The channel path: `-p`, or the method's default.
    pub fn channel_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.path {
            return Some(p.clone());
        }
        match self.method()? {
            Method::VirtioSerial => Some(VIRTIO_SERIAL_PATH.into()),
            Method::IsaSerial => Some(ISA_SERIAL_PATH.into()),
            _ => None,
        }
    }

    /// The `-D` key file, in qemu-ga's key order, values byte for byte.
    pub fn dump(&self) -> Vec<u8> {
        fn key(s: &mut Vec<u8>, k: &str, v: &[u8]) {
            s.extend_from_slice(k.as_bytes());
            s.push(b'=');
            s.extend_from_slice(v);
            s.push(b'\n');
        }
        fn list(items: &[OsString]) -> Vec<u8> {
            items
                .iter()
                .map(|i| i.as_bytes())
                .collect::<Vec<_>>()
                .join(&b","[..])
        }
        fn flag(b: bool) -> &'static [u8] {
            if b { b"true" } else { b"false" }
        }
        let path = |p: &Path| p.as_os_str().as_bytes().to_vec();
        let mut s = b"[general]\n".to_vec();
        key(&mut s, "daemon", flag(self.daemonize));
        key(&mut s, "method", self.method.as_bytes());
        if let Some(p) = self.channel_path() {
            key(&mut s, "path", &path(&p));
        }
        if let Some(l) = &self.logfile {
            key(&mut s, "logfile", &path(l));
        }
        key(&mut s, "pidfile", &path(&self.pidfile));
        if let Some(h) = &self.fsfreeze_hook {
            key(&mut s, "fsfreeze-hook", &path(h));
        }
        key(&mut s, "statedir", &path(&self.statedir));
        key(&mut s, "verbose", flag(self.verbose));
        key(&mut s, "retry-path", flag(self.retry_path));
        key(&mut s, "block-rpcs", &list(&self.block_rpcs));
        if !self.allow_rpcs.is_empty() {
            key(&mut s, "allow-rpcs", &list(&self.allow_rpcs));
        }
        s
    }
}

/// `-h` text.
pub const HELP: &str = "Usage: qvirt-ga [-m <method> -p <path>] [<options>]
qvirt-ga, a QEMU Guest Agent 7.2 compatible agent

  -m, --method      transport method: one of unix-listen, virtio-serial,
                    isa-serial, or vsock-listen (virtio-serial is the default)
  -p, --path        device/socket path (the default for virtio-serial is:
                    /dev/virtio-ports/org.qemu.guest_agent.0,
                    the default for isa-serial is:
                    /dev/ttyS0).
  -l, --logfile     set logfile path, logs to stderr by default
  -f, --pidfile     specify pidfile (default is /var/run/qemu-ga.pid)
  -F, --fsfreeze-hook
                    enable fsfreeze hook. Accepts an optional argument that
                    specifies script to run on freeze/thaw. Script will be
                    called with 'freeze'/'thaw' arguments accordingly.
                    (default is /etc/qemu/fsfreeze-hook)
                    If using -F with an argument, do not follow -F with a
                    space.
  -t, --statedir    specify dir to store state information (absolute paths
                    only, default is /var/run)
  -v, --verbose     log extra debugging information
  -V, --version     print version information and exit
  -d, --daemonize   become a daemon
  -b, --block-rpcs  comma-separated list of RPCs to disable (no spaces,
                    use \"help\" to list available RPCs)
  -a, --allow-rpcs  comma-separated list of RPCs to enable (all others are
                    disabled; use \"help\" to list available RPCs)
  -c, --config      read this config file (must exist; default $QGA_CONF
                    or /etc/qemu/qemu-ga.conf)
  -D, --dump-conf   dump a qemu-ga config file based on current config
                    options / command-line parameters to stdout
  -r, --retry-path  attempt re-opening path if it's unavailable or closed
  -h, --help        display this help and exit
";

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Action {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&args, Some("/nonexistent/qga.conf".into())).expect("parse")
    }

    #[test]
    fn test_cli_table() {
        let want = Config {
            method: "unix-listen".into(),
            path: Some("/s".into()),
            statedir: "/st".into(),
            block_rpcs: vec![
                "guest-info".into(),
                "guest-ping".into(),
                "guest-exec".into(),
            ],
            fsfreeze_hook: Some(DEFAULT_HOOK.into()),
            ..Config::default()
        };
        assert_eq!(
            p(&[
                "-m",
                "unix-listen",
                "-p/s",
                "--statedir=/st",
                "-b",
                "guest-ping,guest-info",
                "--block-rpcs",
                "guest-exec",
                "-F"
            ]),
            Action::Run(want)
        );
        assert_eq!(p(&["-V"]), Action::Version);
        assert_eq!(p(&["-h"]), Action::Help);
        assert_eq!(p(&["-b", "help"]), Action::ListRpcs);
        match p(&["-F/h", "-D"]) {
            Action::Dump(c) => assert_eq!(c.fsfreeze_hook.as_deref(), Some(Path::new("/h"))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_strict_booleans_operands_and_flag_arguments() {
        for bad in ["verbose=yes", "daemon=TRUE", "retry-path=True", "verbose="] {
            let mut c = Config::default();
            let text = format!("[general]\n{bad}\n");
            assert!(apply_keyfile(&mut c, &text, "x").is_err(), "{bad}");
        }
        let mut c = Config::default();
        apply_keyfile(&mut c, "[general]\nverbose= 1 \ndaemon=0\n", "x").expect("ok");
        assert!(c.verbose && !c.daemonize);
        let run = |args: &[&str]| {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            parse(&args, Some("/nonexistent/qga.conf".into()))
        };
        assert!(matches!(run(&["x", "-D", "y"]), Ok(Action::Dump(_))));
        assert!(matches!(run(&["-D", "--", "-V"]), Ok(Action::Dump(_))));
        assert!(matches!(run(&["--help=3"]), Err(e) if e.is_usage()));
        assert!(matches!(run(&["-m"]), Err(e) if e.is_usage()));
        match run(&["-b", "a,b", "--block-rpcs=c,d", "-D"]) {
            Ok(Action::Dump(c)) => assert_eq!(c.block_rpcs, ["b", "a", "d", "c"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_dump_matches_qemu_ga_default() {
        assert_eq!(
            String::from_utf8_lossy(&Config::default().dump()),
            "[general]\ndaemon=false\nmethod=virtio-serial\npath=/dev/virtio-ports/org.qemu.guest_agent.0\npidfile=/var/run/qemu-ga.pid\nstatedir=/var/run\nverbose=false\nretry-path=false\nblock-rpcs=\n"
        );
    }

    #[test]
    fn test_config_file_block_rpcs_is_comma_split() {
        let mut c = Config::default();
        apply_keyfile(
            &mut c,
            "[general]\nblock-rpcs=guest-ping;guest-get-time\nverbose=true\n",
            "x",
        )
        .expect("ok");
        assert_eq!(c.block_rpcs, ["guest-ping;guest-get-time"]);
        assert!(c.verbose);
    }

    /// Arguments that are not UTF-8 (getopt and qemu-ga take any bytes):
    /// paths and lists kept byte for byte, `-D` prints them unchanged; a
    /// bad option byte is a usage error, not a panic.
    #[test]
    fn test_arguments_that_are_not_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let b = |s: &[u8]| OsString::from_vec(s.to_vec());
        let args = [
            b(b"-m"),
            b(b"unix-listen"),
            b(b"-p/tmp/\xe9.sock"),
            b(b"--logfile=/l\xe9"),
            b(b"-f"),
            b(b"/f\xe9"),
            b(b"-F/h\xe9"),
            b(b"--statedir"),
            b(b"/t\xe9"),
            b(b"-b"),
            b(b"gu\xe9,guest-ping"),
            b(b"-D"),
        ];
        let Ok(Action::Dump(c)) = parse(&args, Some(b(b"/nonexistent/\xff"))) else {
            panic!("not a dump");
        };
        assert_eq!(c.path, Some(PathBuf::from(b(b"/tmp/\xe9.sock"))));
        assert_eq!(c.block_rpcs, [b(b"guest-ping"), b(b"gu\xe9")]);
        assert_eq!(
            c.dump(),
            b"[general]\ndaemon=false\nmethod=unix-listen\npath=/tmp/\xe9.sock\nlogfile=/l\xe9\npidfile=/f\xe9\nfsfreeze-hook=/h\xe9\nstatedir=/t\xe9\nverbose=false\nretry-path=false\nblock-rpcs=guest-ping,gu\xe9\n"
        );
        // A method that is not UTF-8 is no method.
        let Ok(Action::Run(c)) = parse(&[b(b"-m\xe9")], Some(b(b"/nonexistent"))) else {
            panic!("not a run");
        };
        assert_eq!(c.method(), None);
        for bad in [&b"-\xe9"[..], b"--\xe9", b"--help=\xe9", b"-v\xff"] {
            match parse(&[b(bad)], Some(b(b"/nonexistent"))) {
                Err(e) => assert!(e.is_usage(), "{e}"),
                Ok(a) => panic!("{a:?}"),
            }
        }
        // -c and $QGA_CONF that are not UTF-8 are read as given.
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join(OsStr::from_bytes(b"c\xe9.conf"));
        std::fs::write(&conf, "[general]\nverbose=true\n").expect("write");
        for (args, env) in [
            (vec![OsString::from("-c"), conf.clone().into()], None),
            (vec![], Some(conf.clone().into())),
        ] {
            match parse(&args, env) {
                Ok(Action::Run(c)) => assert!(c.verbose),
                other => panic!("{other:?}"),
            }
        }
    }
}
