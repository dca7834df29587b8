//! A fault-injecting HTTP proxy in front of a registry.
//!
//! Each client connection carries one request at a time; every request is forwarded on a
//! new upstream connection with `Connection: close`, and the response goes back with
//! `Connection: close`, so framing is simply "until the upstream closes". Rules match a
//! method and a path substring and apply a [`Fault`] to the next `count` matching
//! requests.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Close the client connection with a TCP reset, without a response.
    Reset,
    /// Answer this status (e.g. 503) with an empty body, without asking upstream.
    Status(u16),
    /// Forward, send the response head and `after` body bytes, then hold the connection
    /// open without sending more until the client gives up.
    Stall {
        /// Body bytes sent before stalling.
        after: usize,
    },
    /// Forward, send the head and `after` body bytes, then close.
    Truncate {
        /// Body bytes sent before closing.
        after: usize,
    },
    /// Forward, but flip the bits of the body byte at `at`.
    Corrupt {
        /// Body offset.
        at: usize,
    },
    /// Forward without the `Range` header (the registry then answers 200).
    DropRange,
    /// Answer a canned response.
    Respond {
        /// Status code.
        status: u16,
        /// Extra header lines (`Name: value`).
        headers: Vec<String>,
        /// Body.
        body: Vec<u8>,
    },
    /// Forward, sending the response at `bytes_per_sec` (a slow link).
    Throttle {
        /// Rate.
        bytes_per_sec: u64,
    },
    /// Hold the request this long, then forward it: a request that reaches the registry
    /// late (a slow or congested client), carrying a token that expired meanwhile.
    Hold {
        /// Milliseconds.
        ms: u64,
    },
    /// Answer `307` to `base` + the original path.
    Redirect {
        /// `http://host:port` of the new location.
        base: String,
    },
}

/// A fault for the next `count` requests whose method and path match.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Method to match (`None`: any).
    pub method: Option<String>,
    /// Substring of the path to match.
    pub path: String,
    /// Requests left to apply it to (`u64::MAX`: all).
    pub count: u64,
    /// The fault.
    pub fault: Fault,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    faults: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    authorized: AtomicU64,
    rejected_tokens: AtomicU64,
}

struct Shared {
    upstream: String,
    rules: Mutex<Vec<Rule>>,
    counters: Counters,
    /// `Authorization` value added to upstream requests that have none.
    inject_auth: Mutex<Option<String>>,
    stop: AtomicBool,
    /// `METHOD PATH` of every request, in arrival order.
    log: Mutex<Vec<String>>,
}

/// A running proxy.
pub struct FaultProxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let addr = listener.local_addr().expect("addr").to_string();
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            rules: Mutex::new(Vec::new()),
            counters: Counters::default(),
            inject_auth: Mutex::new(None),
            stop: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &s);
                });
            }
        });
        FaultProxy { addr, shared }
    }

    /// `METHOD PATH` of every request so far, in arrival order, and forgets them.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.shared.log.lock().unwrap())
    }

    /// Adds a rule (rules are tried in order).
    pub fn add(&self, rule: Rule) {
        self.shared.rules.lock().unwrap().push(rule);
    }

    /// A rule for the next `count` requests of `method` whose path contains `path`.
    pub fn on(&self, method: &str, path: &str, count: u64, fault: Fault) {
        self.add(Rule {
            method: Some(method.to_string()),
            path: path.to_string(),
            count,
            fault,
        });
    }

    /// Removes all rules.
    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Adds `Authorization: value` to forwarded requests that carry none.
    pub fn inject_auth(&self, value: Option<String>) {
        *self.shared.inject_auth.lock().unwrap() = value;
    }

    /// Requests seen.
    pub fn requests(&self) -> u64 {
        self.shared.counters.requests.load(Ordering::Relaxed)
    }
    /// Faults applied.
    pub fn faults(&self) -> u64 {
        self.shared.counters.faults.load(Ordering::Relaxed)
    }
    /// Request bytes (heads and bodies) from clients.
    pub fn bytes_up(&self) -> u64 {
        self.shared.counters.bytes_up.load(Ordering::Relaxed)
    }
    /// Response bytes to clients.
    pub fn bytes_down(&self) -> u64 {
        self.shared.counters.bytes_down.load(Ordering::Relaxed)
    }
    /// Requests that carried a Bearer token and were answered 401 (an expired token).
    pub fn rejected_tokens(&self) -> u64 {
        self.shared.counters.rejected_tokens.load(Ordering::Relaxed)
    }
    /// Requests that arrived with an `Authorization` header.
    pub fn authorized(&self) -> u64 {
        self.shared.counters.authorized.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn take_fault(s: &Shared, method: &str, path: &str) -> Option<Fault> {
    let mut rules = s.rules.lock().unwrap();
    let rule = rules.iter_mut().find(|r| {
        r.count > 0 && r.method.as_deref().is_none_or(|m| m == method) && path.contains(&r.path)
    })?;
    if rule.count != u64::MAX {
        rule.count -= 1;
    }
    s.counters.faults.fetch_add(1, Ordering::Relaxed);
    Some(rule.fault.clone())
}

fn handle(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let Some((head, body)) = crate::read_request(&mut r)? else {
        return Ok(());
    };
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    let head_len: usize = head
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 4)
        .sum();
    s.counters.bytes_up.fetch_add(
        (head_len + head.target.len() + body.len()) as u64,
        Ordering::Relaxed,
    );
    if head.header("authorization").is_some() {
        s.counters.authorized.fetch_add(1, Ordering::Relaxed);
    }
    let path = head
        .target
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    s.log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(format!("{} {path}", head.method));
    let fault = take_fault(s, &head.method, &path);
    let send = |bytes: &[u8], out: &mut TcpStream| -> std::io::Result<()> {
        s.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        out.write_all(bytes)
    };
    match &fault {
        Some(Fault::Reset) => {
            socket2::SockRef::from(&out).set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        Some(Fault::Status(code)) => {
            let resp = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return send(resp.as_bytes(), &mut out);
        }
        Some(Fault::Respond {
            status,
            headers,
            body,
        }) => {
            let mut resp = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for h in headers {
                resp.push_str(h);
                resp.push_str("\r\n");
            }
            resp.push_str("\r\n");
            let mut bytes = resp.into_bytes();
            bytes.extend_from_slice(body);
            return send(&bytes, &mut out);
        }
        Some(Fault::Redirect { base }) => {
            let resp = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {base}{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                head.target
            );
            return send(resp.as_bytes(), &mut out);
        }
        Some(Fault::Hold { ms }) => std::thread::sleep(Duration::from_millis(*ms)),
        _ => {}
    }
    // Forward.
    let mut up = TcpStream::connect(&s.upstream)?;
    let mut req = format!("{} {} HTTP/1.1\r\n", head.method, head.target);
    let mut has_auth = false;
    for (k, v) in &head.headers {
        let lk = k.to_ascii_lowercase();
        if lk == "connection" || (lk == "range" && matches!(fault, Some(Fault::DropRange))) {
            continue;
        }
        has_auth |= lk == "authorization";
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_auth {
        if let Some(a) = s.inject_auth.lock().unwrap().clone() {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    // The upstream may answer (e.g. 401) without reading the body; relay that answer.
    let _ = up.write_all(&body);
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    if resp.starts_with(b"HTTP/1.1 401")
        && head
            .header("authorization")
            .is_some_and(|a| a.starts_with("Bearer "))
    {
        s.counters.rejected_tokens.fetch_add(1, Ordering::Relaxed);
    }
    let body_start = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    match fault {
        Some(Fault::Corrupt { at }) if body_start + at < resp.len() => {
            resp[body_start + at] ^= 0xff;
            send(&resp, &mut out)
        }
        Some(Fault::Stall { after }) => {
            send(&resp[..(body_start + after).min(resp.len())], &mut out)?;
            // Hold the connection until the client closes it (bounded, in case it never does).
            out.set_read_timeout(Some(Duration::from_secs(120)))?;
            let mut sink = [0u8; 64];
            while matches!(r.get_mut().read(&mut sink), Ok(n) if n > 0) {}
            Ok(())
        }
        Some(Fault::Truncate { after }) => {
            send(&resp[..(body_start + after).min(resp.len())], &mut out)?;
            out.shutdown(Shutdown::Both)
        }
        Some(Fault::Throttle { bytes_per_sec }) => {
            let start = std::time::Instant::now();
            let mut sent = 0u64;
            for piece in resp.chunks(64 << 10) {
                send(piece, &mut out)?;
                sent += piece.len() as u64;
                let due = Duration::from_secs_f64(sent as f64 / bytes_per_sec.max(1) as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            Ok(())
        }
        _ => send(&resp, &mut out),
    }
}
