//! Test harness for hoist's registry tests: real components where users meet them.
//!
//! - [`Registry`]: the Debian `docker-registry` (distribution 2.8) on a free loopback
//!   port, anonymous, with htpasswd basic auth, or with token auth.
//! - [`TokenServer`]: a token server of our own for token auth, issuing ES256 JWTs the
//!   registry trusts, with a configurable lifetime (to make tokens expire mid-operation).
//! - [`FaultProxy`]: an HTTP proxy between client and registry that resets connections,
//!   answers 5xx, stalls or truncates bodies, corrupts bytes, ignores `Range`, redirects,
//!   and counts requests and bytes.
//! - [`needs`]: what a test needs from the machine (the real test images, root, FUSE, loop
//!   devices, commands); a test that cannot have it fails, saying what is missing.

pub mod needs;
mod proxy;
mod registry;
pub mod token;

pub mod cri;
pub use needs::{fixtures, is_root, require, Need};
pub use proxy::{Fault, FaultProxy, Rule};
pub use registry::{Auth, Registry, TlsFiles};
pub use token::TokenServer;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;

/// A parsed HTTP/1.1 request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Header lines as (name, value), names as sent.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a request head and its `Content-Length` body (chunked request bodies are not
/// used by hoist's client and are refused).
pub fn read_request(
    r: &mut BufReader<TcpStream>,
) -> std::io::Result<Option<(RequestHead, Vec<u8>)>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let head = RequestHead {
        method,
        target,
        headers,
    };
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        return Err(std::io::Error::other(
            "chunked request bodies are not supported",
        ));
    }
    let len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}
