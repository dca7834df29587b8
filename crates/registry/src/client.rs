//! One repository of one registry: requests with authentication, retries and timeouts.
//!
//! Every request goes through [`Client::send`], which
//! - adds the `Authorization` header the registry asked for (Basic, or a Bearer token
//!   fetched from the challenge's realm for this repository's scope),
//! - on a 401, renews the token (or learns the challenge) and resends, so a token that
//!   expires in the middle of a long conversion is replaced transparently; a renewed
//!   token refused at once means refused credentials, one refused after a long request
//!   is renewed again (a few times at most),
//! - on a connection error, a timeout, 429 or 5xx, waits with exponential backoff and
//!   resends, at most [`RegistryConfig::retries`] times and within
//!   [`RegistryConfig::retry_budget`].
//!
//! Redirects (registries send blob reads to object storage) are followed by `reqwest`,
//! which drops the `Authorization` header when the redirect leaves the registry's host.

use crate::auth::{Challenge, Credentials};
use crate::hosts::Endpoint;
use crate::{RegistryConfig, RegistryError};
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// One way to the registry: a mirror or the registry itself, with its own HTTP client
/// (its TLS settings), credentials and authentication state.
#[derive(Debug)]
struct Route {
    endpoint: Endpoint,
    http: Http,
    creds: Option<Credentials>,
    auth: Mutex<Auth>,
}

/// A client for one repository of one registry.
#[derive(Debug)]
pub struct Client {
    /// The endpoints in the order to try them (mirrors, then the registry); requests
    /// are built against the first one's URLs and moved to another as needed.
    routes: Vec<Route>,
    /// The route requests start at: moves past a mirror that failed to connect.
    current: AtomicUsize,
    /// `host:port` as the user named it, for messages and credential lookup.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Scopes requested with tokens, e.g. `repository:a/b:pull,push`.
    scopes: Mutex<Vec<String>>,
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

/// What one route did with a request.
enum Outcome {
    /// The answer (or the error) to return.
    Done(Result<Response, RegistryError>),
    /// A mirror could not answer: try the next route. `sticky` when it could not be
    /// reached at all (later requests skip it too).
    Next { why: String, sticky: bool },
}

/// The HTTP client of an endpoint, with its CAs, client certificate and verification.
fn http_client(cfg: &RegistryConfig, ep: &Endpoint) -> Result<Http, RegistryError> {
    let mut b = Http::builder()
        .connect_timeout(cfg.connect_timeout)
        // In the blocking client this bounds the wait for response headers and each
        // read of a body: a stall, not a whole transfer.
        .timeout(cfg.stall_timeout)
        .user_agent(concat!("hoist/", env!("CARGO_PKG_VERSION")));
    let read = |p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| RegistryError::Config(format!("{} (for {}): {e}", p.display(), ep.origin)))
    };
    for ca in &ep.tls.ca {
        let pem = read(ca)?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!("{}: not a PEM certificate: {e}", ca.display()))
        })? {
            b = b.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = ep.tls.client.first() {
        let mut pem = read(cert)?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(read(key)?);
        }
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "client certificate {} for {}: {e}",
                cert.display(),
                ep.origin
            ))
        })?;
        b = b.identity(id);
    }
    if ep.tls.skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    b.build()
        .map_err(|e| RegistryError::Config(format!("HTTP client for {}: {e}", ep.origin)))
}

impl Client {
    /// A client for `registry`/`repository`, asking tokens for `actions` (`pull` or
    /// `pull,push`). The endpoints come from the registry's hosts.toml under
    /// [`RegistryConfig::hosts_dir`]: pulls try its mirrors first, pushes go only to
    /// endpoints that take them.
    pub fn new(
        registry: &str,
        repository: &str,
        actions: &str,
        cfg: &RegistryConfig,
    ) -> Result<Client, RegistryError> {
        let push = actions.contains("push");
        let endpoints = crate::hosts::endpoints(cfg.hosts_dir.as_deref(), registry, cfg.plain_http)
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        let routes = endpoints
            .into_iter()
            .filter(|e| if push { e.push } else { e.pull })
            .map(|endpoint| {
                // The registry's own credentials go to the registry only; a mirror gets
                // what the auth files hold for its host.
                let creds = match endpoint.server {
                    true => cfg
                        .creds
                        .clone()
                        .or_else(|| Credentials::from_auth_files(registry)),
                    false => Credentials::from_auth_files(host_of(&endpoint.origin)),
                };
                Ok(Route {
                    http: http_client(cfg, &endpoint)?,
                    endpoint,
                    creds,
                    auth: Mutex::new(Auth::Unknown),
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        if routes.is_empty() {
            return Err(RegistryError::Config(format!(
                "{registry}: its hosts.toml lists no endpoint that takes {}",
                if push { "pushes" } else { "pulls" }
            )));
        }
        Ok(Client {
            routes,
            current: AtomicUsize::new(0),
            registry: registry.to_string(),
            repository: repository.to_string(),
            scopes: Mutex::new(vec![format!("repository:{repository}:{actions}")]),
            cfg: cfg.clone(),
            counters: Counters::default(),
        })
    }

    /// `HOST/REPO`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The URL of `path` under `/v2/REPO/` (of the first endpoint; [`Client::send`] moves
    /// a request to the endpoint it goes to).
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}/{path}", self.routes[0].endpoint.api, self.repository)
    }

    /// Resolves an upload `Location` (absolute or relative to the registry).
    pub fn resolve(&self, location: &str) -> Result<reqwest::Url, RegistryError> {
        let origin = &self.routes[0].endpoint.origin;
        let base = reqwest::Url::parse(origin)
            .map_err(|e| RegistryError::Config(format!("{origin}: {e}")))?;
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
            for k in 0..self.routes.len() {
                self.invalidate_token(k);
            }
        }
    }

    /// Sends the request `build` makes, with authentication and retries; `what` names the
    /// operation in errors. Returns the response whatever its status, except 401, which
    /// becomes [`RegistryError::Unauthorized`] when renewing credentials did not help.
    ///
    /// With mirrors, the request goes to the first that answers: a mirror that cannot
    /// be reached, or answers 404 or a server error, passes it on to the next endpoint
    /// at once (no retries there), and one that cannot be reached is skipped by later
    /// requests. The last endpoint, the registry itself, gets the retries.
    pub fn send(
        &self,
        what: &str,
        idempotent: Idempotent,
        build: impl Fn(&Http) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let first = self
            .current
            .load(Ordering::Relaxed)
            .min(self.routes.len() - 1);
        for k in first..self.routes.len() {
            match self.send_to(k, what, idempotent, &build) {
                Outcome::Done(r) => return r,
                Outcome::Next { why, sticky } => {
                    let (mirror, next) = (
                        &self.routes[k].endpoint.origin,
                        &self.routes[k + 1].endpoint.origin,
                    );
                    // A mirror without the content is normal; one that is down is news
                    // (and is said once: later requests skip it).
                    match sticky {
                        true => tracing::warn!(
                            "{what}: mirror {mirror} of {}: {why}; using {next} from now on",
                            self.registry
                        ),
                        false => tracing::debug!(
                            "{what}: mirror {mirror} of {}: {why}; trying {next}",
                            self.registry
                        ),
                    }
                    if sticky {
                        let _ = self.current.compare_exchange(
                            k,
                            k + 1,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
            }
        }
        unreachable!("the last route always answers")
    }

    /// The request, built against the first endpoint, moved to endpoint `k`.
    fn request_for(
        &self,
        k: usize,
        mut req: reqwest::blocking::Request,
    ) -> reqwest::blocking::Request {
        if k == 0 {
            return req;
        }
        let (from, to) = (&self.routes[0].endpoint.api, &self.routes[k].endpoint.api);
        if let Some(rest) = req.url().as_str().strip_prefix(from.as_str()) {
            if let Ok(url) = reqwest::Url::parse(&format!("{to}{rest}")) {
                *req.url_mut() = url;
            }
        }
        req
    }

    fn send_to(
        &self,
        k: usize,
        what: &str,
        idempotent: Idempotent,
        build: &impl Fn(&Http) -> RequestBuilder,
    ) -> Outcome {
        let route = &self.routes[k];
        let mirror = k + 1 < self.routes.len();
        let start = Instant::now();
        let mut attempt = 0u32;
        // When this request last renewed its token, and how often it did.
        let mut renewed: Option<Instant> = None;
        let mut renewals = 0u32;
        loop {
            let req = match build(&route.http).build() {
                Ok(r) => self.request_for(k, r),
                Err(e) => {
                    return Outcome::Done(Err(RegistryError::Transport {
                        what: format!("{what} ({})", self.name()),
                        attempts: 0,
                        cause: e,
                    }))
                }
            };
            let mut req = req;
            // Credentials go only to the endpoint itself, never to another origin an
            // upload Location may name.
            if self.same_origin(k, req.url()) {
                match self.authorization(k, what) {
                    Ok(Some(value)) => match reqwest::header::HeaderValue::from_str(&value) {
                        Ok(v) => {
                            req.headers_mut().insert(AUTHORIZATION, v);
                        }
                        Err(_) => {
                            return Outcome::Done(Err(RegistryError::Config(
                                "credentials are not a valid header".into(),
                            )))
                        }
                    },
                    Ok(None) => {}
                    Err(e) if mirror => {
                        return Outcome::Next {
                            why: e.to_string(),
                            sticky: false,
                        }
                    }
                    Err(e) => return Outcome::Done(Err(e)),
                }
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let retry_in = match route.http.execute(req) {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    // A token refused right after it was issued means the credentials
                    // are refused; one refused after a long request (a large upload on
                    // a slow link) may have expired in flight, and is renewed again.
                    let expired_in_flight =
                        renewed.is_some_and(|at| at.elapsed() >= IN_FLIGHT_EXPIRY);
                    if renewed.is_some() && (!expired_in_flight || renewals >= MAX_RENEWALS) {
                        let e = self.unauthorized(k, what, resp);
                        return match mirror {
                            true => Outcome::Next {
                                why: e.to_string(),
                                sticky: false,
                            },
                            false => Outcome::Done(Err(e)),
                        };
                    }
                    tracing::debug!("{what}: 401 from {}, authenticating", route.endpoint.origin);
                    if let Err(e) = self.authenticate(k, what, resp.headers()) {
                        return match mirror {
                            true => Outcome::Next {
                                why: e.to_string(),
                                sticky: false,
                            },
                            false => Outcome::Done(Err(e)),
                        };
                    }
                    renewed = Some(Instant::now());
                    renewals += 1;
                    continue;
                }
                Ok(resp)
                    if mirror
                        && (is_retryable(resp.status())
                            || resp.status() == StatusCode::NOT_FOUND) =>
                {
                    return Outcome::Next {
                        why: format!("answered {}", resp.status()),
                        sticky: false,
                    };
                }
                Ok(resp) if is_retryable(resp.status()) => {
                    let hint = retry_after(resp.headers());
                    if !self.may_retry(attempt, start) {
                        return Outcome::Done(Ok(resp));
                    }
                    tracing::debug!("{what}: {} from {}, retrying", resp.status(), self.name());
                    hint
                }
                Ok(resp) => return Outcome::Done(Ok(resp)),
                Err(e) if mirror && !e.is_builder() => {
                    return Outcome::Next {
                        why: describe_transport(&e),
                        sticky: e.is_connect(),
                    };
                }
                Err(e) if is_malformed_response(&e) => {
                    return Outcome::Done(Err(self.malformed(what, &e)));
                }
                Err(e) => {
                    // A registry may answer 401 to an expired token before reading a large
                    // body and close the connection, which the client sees as a send error
                    // rather than a 401: renew a Bearer token before resending.
                    self.invalidate_token(k);
                    let transient = !e.is_builder() && !e.is_redirect() && !is_tls(&e);
                    if !transient || idempotent == Idempotent::No || !self.may_retry(attempt, start)
                    {
                        return Outcome::Done(Err(RegistryError::Transport {
                            what: format!("{what} ({})", self.name()),
                            attempts: attempt + 1,
                            cause: e,
                        }));
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

    fn same_origin(&self, k: usize, url: &reqwest::Url) -> bool {
        reqwest::Url::parse(&self.routes[k].endpoint.origin).is_ok_and(|b| {
            b.scheme() == url.scheme()
                && b.host_str() == url.host_str()
                && b.port_or_known_default() == url.port_or_known_default()
        })
    }

    /// Sends one request with a short timeout and no retries, for best-effort cleanup
    /// (cancelling an upload) that must not hold up an error path.
    pub fn send_once(&self, build: impl Fn(&Http) -> RequestBuilder) {
        let k = self
            .current
            .load(Ordering::Relaxed)
            .min(self.routes.len() - 1);
        let route = &self.routes[k];
        let mut req = build(&route.http).timeout(Duration::from_secs(5));
        let auth = route.auth.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match auth {
            Auth::Basic(v) => req = req.header(AUTHORIZATION, v),
            Auth::Bearer {
                token: Some((t, _)),
                ..
            } => req = req.header(AUTHORIZATION, format!("Bearer {t}")),
            _ => {}
        }
        if let Ok(r) = req.build() {
            let r = self.request_for(k, r);
            if self.same_origin(k, r.url()) {
                let _ = route.http.execute(r);
            }
        }
    }

    fn invalidate_token(&self, k: usize) {
        let mut auth = self.routes[k]
            .auth
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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

    fn authorization(&self, k: usize, what: &str) -> Result<Option<String>, RegistryError> {
        let auth = self.routes[k]
            .auth
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match auth {
            Auth::Unknown => Ok(None),
            Auth::Basic(value) => Ok(Some(value)),
            Auth::Bearer {
                token: Some((t, expiry)),
                ..
            } if Instant::now() < expiry => Ok(Some(format!("Bearer {t}"))),
            Auth::Bearer { realm, service, .. } => Ok(Some(format!(
                "Bearer {}",
                self.fetch_token(k, what, &realm, service)?
            ))),
        }
    }

    /// A response that could not be parsed: permanent, whatever the retry settings.
    fn malformed(&self, what: &str, e: &reqwest::Error) -> RegistryError {
        RegistryError::Protocol {
            what: format!("{what} ({})", self.name()),
            why: format!(
                "the registry's response cannot be parsed ({}): a malformed or oversized \
                 header (hoist reads response heads of up to 400 KiB). Resending cannot help; \
                 check the registry, or a proxy in front of it",
                describe_transport(e)
            ),
        }
    }

    /// Learns (or renews) authentication from a 401's challenge.
    fn authenticate(&self, k: usize, what: &str, headers: &HeaderMap) -> Result<(), RegistryError> {
        if let Some(v) = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .find(|v| v.len() > MAX_CHALLENGE)
        {
            return Err(RegistryError::Unauthorized {
                what: format!("{what} ({})", self.name()),
                why: format!(
                    "the registry's WWW-Authenticate challenge is {} bytes, more than the {} \
                     a challenge can sensibly take: not retried. Check the registry (or a \
                     proxy in front of it)",
                    v.len(),
                    MAX_CHALLENGE
                ),
            });
        }
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse);
        let route = &self.routes[k];
        let mut auth = route.auth.lock().unwrap_or_else(|e| e.into_inner());
        match challenge {
            Some(Challenge::Basic) => {
                let creds = route
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
        k: usize,
        what: &str,
        realm: &str,
        service: Option<String>,
    ) -> Result<String, RegistryError> {
        let route = &self.routes[k];
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
            let mut req = route.http.get(realm).query(&query);
            if let Some(c) = &route.creds {
                req = req.header(AUTHORIZATION, c.basic());
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match req.send() {
                Ok(r) if is_retryable(r.status()) && self.may_retry(attempt, start) => {}
                Ok(r) => break r,
                Err(e) if is_malformed_response(&e) => {
                    return Err(self.malformed(&format!("token from {realm}"), &e))
                }
                Err(e) if !self.may_retry(attempt, start) || is_tls(&e) => {
                    return Err(RegistryError::Transport {
                        what: format!("token for {} from {realm}", self.name()),
                        attempts: attempt + 1,
                        cause: e,
                    })
                }
                Err(_) => {}
            }
            std::thread::sleep(self.backoff(attempt));
            attempt += 1;
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(match &route.creds {
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
        let mut auth = route.auth.lock().unwrap_or_else(|e| e.into_inner());
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

    fn unauthorized(&self, k: usize, what: &str, resp: Response) -> RegistryError {
        let detail = crate::remote::error_detail(resp);
        let why = match &self.routes[k].creds {
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

/// The longest `WWW-Authenticate` value read: a scheme and a few parameters (realm,
/// service, scope) fit in far less; anything longer is refused unparsed (to prevent
/// denial of service).
pub const MAX_CHALLENGE: usize = 16 << 10;

/// A token refused this long after this request renewed it may have expired while the
/// request was in flight; a refusal sooner means the credentials are refused.
const IN_FLIGHT_EXPIRY: Duration = Duration::from_secs(1);
/// Most times one request renews its token.
const MAX_RENEWALS: u32 = 3;

/// Whether hyper could not parse the response (a head over its 400 KiB limit, an invalid
/// header or status line): the registry will send the same again, so resending is futile.
pub(crate) fn is_malformed_response(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// `host[:port]` of an origin (`https://host:port`).
fn host_of(origin: &str) -> &str {
    origin.split_once("://").map_or(origin, |(_, h)| h)
}

/// Whether a transport error is a TLS failure (an untrusted or invalid certificate):
/// resending cannot help.
pub(crate) fn is_tls(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("certificate")
            || text.contains("InvalidCertificate")
            || text.contains("tls") && text.contains("handshake")
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A transport error with its causes, in one line.
pub(crate) fn describe_transport(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        source = s.source();
    }
    out
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
