//! One repository of one registry: requests with authentication, retries and timeouts.
//!
//! Every request goes through [`Client::send`], which
//! - adds the `Authorization` header the registry asked for (Basic, or a Bearer token
//!   fetched from the challenge's realm for this repository's scope),
//! - on a 401, renews the token (or learns the challenge) once and resends, so a token
//!   that expires in the middle of a long conversion is replaced transparently,
//! - on a connection error, a timeout, 429 or 5xx, waits with exponential backoff and
//!   resends, at most [`RegistryConfig::retries`] times and within
//!   [`RegistryConfig::retry_budget`].
//!
//! Redirects (registries send blob reads to object storage) are followed by `reqwest`,
//! which drops the `Authorization` header when the redirect leaves the registry's host.

use crate::auth::{Challenge, Credentials};
use crate::{RegistryConfig, RegistryError};
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Byte and request counters of a client.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests sent, retries included.
    pub requests: AtomicU64,
    /// Requests resent after an error.
    pub retries: AtomicU64,
    /// Tokens fetched from a token server.
    pub tokens: AtomicU64,
    /// Body bytes received.
    pub bytes_in: AtomicU64,
    /// Body bytes sent.
    pub bytes_out: AtomicU64,
}

#[derive(Debug, Clone)]
enum Auth {
    /// No challenge seen yet: requests go out anonymously.
    Unknown,
    /// Basic credentials on every request.
    Basic(String),
    /// Bearer tokens from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        token: Option<(String, Instant)>,
    },
}

/// A client for one repository of one registry.
#[derive(Debug)]
pub struct Client {
    http: Http,
    /// `https://host:port` or `http://...`.
    base: String,
    /// `host:port` as the user named it, for messages and credential lookup.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Scopes requested with tokens, e.g. `repository:a/b:pull,push`.
    scopes: Mutex<Vec<String>>,
    creds: Option<Credentials>,
    auth: Mutex<Auth>,
    pub(crate) cfg: RegistryConfig,
    /// Counters.
    pub counters: Counters,
}

/// Which requests of a [`Client::send`] may be resent after a transport error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotent {
    /// Resending is harmless (GET, HEAD, PUT of a manifest, PATCH of a known range).
    Yes,
    /// Resend only on a status the server sent (429/5xx), never after a lost response.
    No,
}

impl Client {
    /// A client for `registry`/`repository`, asking tokens for `actions` (`pull` or
    /// `pull,push`).
    pub fn new(
        registry: &str,
        repository: &str,
        actions: &str,
        cfg: &RegistryConfig,
    ) -> Result<Client, RegistryError> {
        let http = Http::builder()
            .connect_timeout(cfg.connect_timeout)
            // In the blocking client this bounds the wait for response headers and each
            // read of a body: a stall, not a whole transfer.
            .timeout(cfg.stall_timeout)
            .user_agent(concat!("hoist/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RegistryError::Config(format!("HTTP client: {e}")))?;
        let endpoint = match registry {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        };
        let scheme = if cfg.plain_http { "http" } else { "https" };
        let creds = cfg
            .creds
            .clone()
            .or_else(|| Credentials::from_auth_files(registry));
        Ok(Client {
            http,
            base: format!("{scheme}://{endpoint}"),
            registry: registry.to_string(),
            repository: repository.to_string(),
            scopes: Mutex::new(vec![format!("repository:{repository}:{actions}")]),
            creds,
            auth: Mutex::new(Auth::Unknown),
            cfg: cfg.clone(),
            counters: Counters::default(),
        })
    }

    /// `HOST/REPO`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The URL of `path` under `/v2/REPO/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.base, self.repository)
    }

    /// Resolves an upload `Location` (absolute or relative to the registry).
    pub fn resolve(&self, location: &str) -> Result<reqwest::Url, RegistryError> {
        let base = reqwest::Url::parse(&self.base)
            .map_err(|e| RegistryError::Config(format!("{}: {e}", self.base)))?;
        base.join(location).map_err(|e| RegistryError::Protocol {
            what: self.name(),
            why: format!("bad Location {location:?}: {e}"),
        })
    }

    /// Adds a scope to later token requests (e.g. pull on a repository to mount from).
    /// The current token is dropped if the scope is new.
    pub fn add_scope(&self, scope: String) {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        if !scopes.contains(&scope) {
            scopes.push(scope);
            self.invalidate_token();
        }
    }

    /// Sends the request `build` makes, with authentication and retries; `what` names the
    /// operation in errors. Returns the response whatever its status, except 401, which
    /// becomes [`RegistryError::Unauthorized`] when renewing credentials did not help.
    pub fn send(
        &self,
        what: &str,
        idempotent: Idempotent,
        build: impl Fn(&Http) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let start = Instant::now();
        let mut attempt = 0u32;
        let mut renewed = false;
        loop {
            let mut req = build(&self.http)
                .build()
                .map_err(|e| RegistryError::Transport {
                    what: format!("{what} ({})", self.name()),
                    attempts: 0,
                    source: e,
                })?;
            // Credentials go only to the registry itself, never to another origin an
            // upload Location may name.
            if self.same_origin(req.url()) {
                if let Some(value) = self.authorization(what)? {
                    let value = reqwest::header::HeaderValue::from_str(&value).map_err(|_| {
                        RegistryError::Config("credentials are not a valid header".into())
                    })?;
                    req.headers_mut().insert(AUTHORIZATION, value);
                }
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let retry_in = match self.http.execute(req) {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    if renewed {
                        return Err(self.unauthorized(what, resp));
                    }
                    tracing::debug!("{what}: 401 from {}, authenticating", self.name());
                    renewed = true;
                    self.authenticate(what, resp.headers())?;
                    continue;
                }
                Ok(resp) if is_retryable(resp.status()) => {
                    let hint = retry_after(resp.headers());
                    if !self.may_retry(attempt, start) {
                        return Ok(resp);
                    }
                    tracing::debug!("{what}: {} from {}, retrying", resp.status(), self.name());
                    hint
                }
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    // A registry may answer 401 to an expired token before reading a large
                    // body and close the connection, which the client sees as a send error
                    // rather than a 401: renew a Bearer token before resending.
                    self.invalidate_token();
                    let transient = !e.is_builder() && !e.is_redirect();
                    if !transient || idempotent == Idempotent::No || !self.may_retry(attempt, start)
                    {
                        return Err(RegistryError::Transport {
                            what: format!("{what} ({})", self.name()),
                            attempts: attempt + 1,
                            source: e,
                        });
                    }
                    tracing::debug!("{what}: {e}, retrying");
                    None
                }
            };
            std::thread::sleep(retry_in.unwrap_or_else(|| self.backoff(attempt)));
            attempt += 1;
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bound on sending a body of `len` bytes and getting the answer: the stall timeout
    /// plus the body at 256 KiB/s (the blocking client's timeout covers the whole send).
    pub(crate) fn upload_timeout(&self, len: usize) -> Duration {
        self.cfg.stall_timeout + Duration::from_secs(len as u64 / (256 << 10))
    }

    fn same_origin(&self, url: &reqwest::Url) -> bool {
        reqwest::Url::parse(&self.base).is_ok_and(|b| {
            b.scheme() == url.scheme()
                && b.host_str() == url.host_str()
                && b.port_or_known_default() == url.port_or_known_default()
        })
    }

    /// Sends one request with a short timeout and no retries, for best-effort cleanup
    /// (cancelling an upload) that must not hold up an error path.
    pub fn send_once(&self, build: impl Fn(&Http) -> RequestBuilder) {
        let mut req = build(&self.http).timeout(Duration::from_secs(5));
        let auth = self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match auth {
            Auth::Basic(v) => req = req.header(AUTHORIZATION, v),
            Auth::Bearer {
                token: Some((t, _)),
                ..
            } => req = req.header(AUTHORIZATION, format!("Bearer {t}")),
            _ => {}
        }
        if let Ok(r) = req.build() {
            if self.same_origin(r.url()) {
                let _ = self.http.execute(r);
            }
        }
    }

    fn invalidate_token(&self) {
        let mut auth = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        if let Auth::Bearer { token, .. } = &mut *auth {
            *token = None;
        }
    }

    fn may_retry(&self, attempt: u32, start: Instant) -> bool {
        attempt < self.cfg.retries
            && start.elapsed() + self.backoff(attempt) <= self.cfg.retry_budget
    }

    /// Exponential backoff from [`RegistryConfig::backoff`], doubling up to 8 s, with up
    /// to 25% jitter so that many nodes retrying at once spread out.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .cfg
            .backoff
            .saturating_mul(1 << attempt.min(10))
            .min(Duration::from_secs(8));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    fn authorization(&self, what: &str) -> Result<Option<String>, RegistryError> {
        let auth = self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match auth {
            Auth::Unknown => Ok(None),
            Auth::Basic(value) => Ok(Some(value)),
            Auth::Bearer {
                token: Some((t, expiry)),
                ..
            } if Instant::now() < expiry => Ok(Some(format!("Bearer {t}"))),
            Auth::Bearer { realm, service, .. } => Ok(Some(format!(
                "Bearer {}",
                self.fetch_token(what, &realm, service)?
            ))),
        }
    }

    /// Learns (or renews) authentication from a 401's challenge.
    fn authenticate(&self, what: &str, headers: &HeaderMap) -> Result<(), RegistryError> {
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse);
        let mut auth = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        match challenge {
            Some(Challenge::Basic) => {
                let creds = self
                    .creds
                    .as_ref()
                    .ok_or_else(|| self.no_credentials(what))?;
                *auth = Auth::Basic(creds.basic());
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                // A new token is fetched on the next request.
                *auth = Auth::Bearer {
                    realm,
                    service,
                    token: None,
                };
            }
            None => {
                return Err(RegistryError::Unauthorized {
                    what: format!("{what} ({})", self.name()),
                    why: "the registry answered 401 without a Basic or Bearer challenge".into(),
                })
            }
        }
        Ok(())
    }

    fn fetch_token(
        &self,
        what: &str,
        realm: &str,
        service: Option<String>,
    ) -> Result<String, RegistryError> {
        let scopes = self
            .scopes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut query: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", s.as_str())).collect();
        if let Some(s) = &service {
            query.push(("service", s));
        }
        let start = Instant::now();
        let mut attempt = 0;
        let resp = loop {
            let mut req = self.http.get(realm).query(&query);
            if let Some(c) = &self.creds {
                req = req.header(AUTHORIZATION, c.basic());
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match req.send() {
                Ok(r) if is_retryable(r.status()) && self.may_retry(attempt, start) => {}
                Ok(r) => break r,
                Err(e) if !self.may_retry(attempt, start) => {
                    return Err(RegistryError::Transport {
                        what: format!("token for {} from {realm}", self.name()),
                        attempts: attempt + 1,
                        source: e,
                    })
                }
                Err(_) => {}
            }
            std::thread::sleep(self.backoff(attempt));
            attempt += 1;
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(match &self.creds {
                None => self.no_credentials(what),
                Some(c) => RegistryError::Unauthorized {
                    what: format!("{what} ({})", self.name()),
                    why: format!(
                        "the token server {realm} refused the credentials of {:?} (from {})",
                        c.user, c.origin
                    ),
                },
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Protocol {
                what: format!("token for {}", self.name()),
                why: format!("{realm} answered {status}"),
            });
        }
        let body = crate::remote::read_limited(resp, 1 << 20, &format!("token from {realm}"))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
                what: format!("token for {}", self.name()),
                why: format!("{realm} sent invalid JSON: {e}"),
            })?;
        let token = doc["token"]
            .as_str()
            .or_else(|| doc["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Protocol {
                what: format!("token for {}", self.name()),
                why: format!("{realm} sent no token"),
            })?
            .to_string();
        // The spec's default lifetime is 60 s; renew a little early.
        let lifetime = Duration::from_secs(doc["expires_in"].as_u64().unwrap_or(60).max(1));
        let expiry = start + lifetime.mul_f64(0.9);
        self.counters.tokens.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            "new token for {} from {realm}, valid {lifetime:?}",
            self.name()
        );
        let mut auth = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        if let Auth::Bearer { token: slot, .. } = &mut *auth {
            *slot = Some((token.clone(), expiry));
        }
        Ok(token)
    }

    fn no_credentials(&self, what: &str) -> RegistryError {
        RegistryError::Unauthorized {
            what: format!("{what} ({})", self.name()),
            why: "no credentials found for this registry; pass --creds USER:PASSWORD or log in \
                  (docker login / skopeo login)"
                .into(),
        }
    }

    fn unauthorized(&self, what: &str, resp: Response) -> RegistryError {
        let detail = crate::remote::error_detail(resp);
        let why = match &self.creds {
            None => format!(
                "no credentials found for this registry; pass --creds USER:PASSWORD or log in \
                 ({detail})"
            ),
            Some(c) => format!(
                "the registry refused the credentials of {:?} from {} ({detail})",
                c.user, c.origin
            ),
        };
        RegistryError::Unauthorized {
            what: format!("{what} ({})", self.name()),
            why,
        }
    }
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// A `Retry-After` in seconds, capped at 10 s.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(10)))
}
