//! A token server for registry token auth, as an authentication service does it.
//!
//! It signs ES256 JWTs with a key whose self-signed certificate the registry trusts
//! (`rootcertbundle`); the JWT header's `kid` is the libtrust key ID of that key, which is
//! how distribution 2.8 finds the verifying key. One user is known; it is granted the
//! actions it asks for, anonymous requests get no access.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Service name the registry and the tokens use.
pub const SERVICE: &str = "hoist-test-registry";
/// Issuer of the tokens.
pub const ISSUER: &str = "hoist-test-issuer";
/// Seconds distribution 2.8 accepts a token past its `exp` (measured here: a token was
/// still accepted 27 s after `exp` and refused 67 s after).
const REGISTRY_LEEWAY: u64 = 60;

/// A running token server; stops accepting when dropped.
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// The certificate to give the registry.
    pub cert: PathBuf,
    /// Tokens issued so far.
    pub issued: Arc<AtomicU64>,
    lifetime: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

struct Config {
    user: String,
    password: String,
    /// How long the registry accepts a token, in seconds (changeable while running).
    lifetime: Arc<AtomicU64>,
    /// `expires_in` told to the client; larger than `lifetime` to make the client find
    /// out about expiry from a 401, as it does when clocks disagree or tokens are revoked.
    advertised: u64,
    key: jsonwebtoken::EncodingKey,
    kid: String,
}

impl TokenServer {
    /// Starts a server that knows `user`/`password` and issues tokens the registry accepts
    /// for `lifetime` (rounded up to whole seconds), while telling clients they last
    /// `advertised` seconds.
    pub fn start(user: &str, password: &str, lifetime: Duration, advertised: u64) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("hoist-token-")
            .tempdir()
            .expect("token server directory");
        let (key_pem, spki_der, cert) = make_key(dir.path());
        let lifetime = Arc::new(AtomicU64::new(lifetime.as_secs()));
        let cfg = Arc::new(Config {
            user: user.into(),
            password: password.into(),
            lifetime: lifetime.clone(),
            advertised,
            key: jsonwebtoken::EncodingKey::from_ec_pem(&key_pem).expect("EC key"),
            kid: libtrust_key_id(&spki_der),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("token server port");
        let realm = format!("http://{}/token", listener.local_addr().expect("addr"));
        let issued = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (issued2, stop2) = (issued.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (cfg, issued) = (cfg.clone(), issued2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &cfg, &issued);
                });
            }
        });
        TokenServer {
            realm,
            cert,
            issued,
            lifetime,
            stop,
            _dir: dir,
        }
    }
}

impl TokenServer {
    /// Changes how long tokens issued from now on are accepted.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime.store(lifetime.as_secs(), Ordering::Relaxed);
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let addr = self
            .realm
            .trim_start_matches("http://")
            .trim_end_matches("/token");
        let _ = std::net::TcpStream::connect(addr);
    }
}

/// Key, its SPKI DER, and a self-signed certificate file, made with openssl.
fn make_key(dir: &Path) -> (Vec<u8>, Vec<u8>, PathBuf) {
    let key = dir.join("key.pem");
    let cert = dir.join("cert.pem");
    let der = dir.join("pub.der");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (k, c, d) = (
        key.to_str().unwrap(),
        cert.to_str().unwrap(),
        der.to_str().unwrap(),
    );
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        k,
        "-out",
        c,
        "-days",
        "2",
        "-subj",
        "/CN=hoist-test-token-signer",
    ]);
    run(&["pkey", "-in", k, "-pubout", "-outform", "DER", "-out", d]);
    (
        std::fs::read(&key).unwrap(),
        std::fs::read(&der).unwrap(),
        cert,
    )
}

/// The libtrust key ID: base32 of the first 240 bits of SHA-256(SPKI), in groups of 4.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    let hash = Sha256::digest(spki_der);
    let b32 = base32(&hash[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 4648 base32 without padding (libtrust trims it).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn serve(conn: std::net::TcpStream, cfg: &Config, issued: &AtomicU64) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let Some((head, _)) = crate::read_request(&mut r)? else {
        return Ok(());
    };
    let authenticated = head.header("authorization").and_then(|v| {
        let b64 = v.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (u, p) = raw.split_once(':')?;
        Some(u == cfg.user && p == cfg.password)
    });
    if authenticated == Some(false) {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        write!(
            out,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let query = head.target.split_once('?').map_or("", |(_, q)| q);
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "scope" {
            continue;
        }
        let v = percent_decode(v);
        let Some(rest) = v.strip_prefix("repository:") else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let actions: Vec<&str> = if authenticated == Some(true) {
            actions.split(',').collect()
        } else {
            Vec::new()
        };
        access.push(serde_json::json!({"type": "repository", "name": name, "actions": actions}));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let n = issued.fetch_add(1, Ordering::Relaxed);
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": if authenticated == Some(true) { cfg.user.as_str() } else { "" },
        "aud": SERVICE,
        // distribution accepts tokens until `exp` + 60 s (its clock-skew leeway).
        "exp": (now + cfg.lifetime.load(Ordering::Relaxed)).saturating_sub(REGISTRY_LEEWAY),
        "nbf": now.saturating_sub(1),
        "iat": now,
        "jti": format!("hoist-test-{n}-{now}"),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(cfg.kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, &cfg.key).expect("signing a token");
    let body = serde_json::json!({"token": token, "expires_in": cfg.advertised}).to_string();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(
            percent_decode("repository%3Aa%2Fb%3Apull%2Cpush"),
            "repository:a/b:pull,push"
        );
    }
}
