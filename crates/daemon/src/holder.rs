//! The holder: a small process that keeps the mounts' FUSE connections open while the
//! process serving them (the server, its child) dies, restarts or is replaced.
//!
//! `hoist daemon run` is the holder. It takes the state root's lock, binds the API socket
//! (so clients queue in its backlog while no server runs, rather than failing), and runs
//! `hoist daemon serve` as its child, restarting it at once whenever it exits without
//! having asked to stop. The server hands the holder, over `holder.sock`, a duplicate of
//! each mount's `/dev/fuse` file with an opaque record of the mount, and its successor
//! gets them back ([`HolderClient::hello`]): the kernel keeps a FUSE connection for as
//! long as any process holds its file, so the mounts live on, and requests read but not
//! answered by the dead server wait for the next one, which has the kernel send them
//! again (`hoist_fs::takeover`). The holder fetches nothing, parses no image and no
//! record: it keeps bytes and file descriptors.
//!
//! Why a process of hoist's own and not systemd's file descriptor store: hoist runs
//! under containerd on nodes with and without systemd, `hoist mount` starts its daemon
//! on demand, and the store keeps descriptors only for a service's own restarts; a
//! holder of about 300 lines does the same everywhere. Under systemd, the holder is
//! the service's main process.
//!
//! If the holder dies, the server dies with it (`PR_SET_PDEATHSIG`): the connections
//! close, readers get ENOTCONN at once, and the mount records are left for `hoist
//! umount` and the next daemon to clean up, as when a daemon died before there was a
//! holder.

use crate::home::Home;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A message between the server and the holder. One per datagram (`SOCK_SEQPACKET`);
/// file descriptors travel beside it (`SCM_RIGHTS`).
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    /// Server: I am starting; send me what you hold.
    Hello {
        /// The server's pid.
        pid: u32,
    },
    /// Holder: the API socket (one descriptor), and `mounts` [`Message::Held`] follow.
    State {
        /// Mounts held.
        mounts: usize,
        /// What the status shows.
        info: HolderInfo,
    },
    /// Holder: one held mount, with its descriptors.
    Held {
        /// The mount's key.
        key: String,
        /// The server's record of it (opaque to the holder).
        record: String,
    },
    /// Server: keep these descriptors and this record for the mount `key`, replacing
    /// what was held for it.
    Hold {
        /// The mount's key.
        key: String,
        /// The record.
        record: String,
    },
    /// Server: the mount `key` is gone; close its descriptors.
    Release {
        /// The mount's key.
        key: String,
    },
    /// Server: I am stopping for good (everything is unmounted); do not restart me.
    Stopping,
    /// Server: how are you?
    Status,
    /// Holder: this.
    Info(HolderInfo),
    /// Holder: done.
    Done,
}

/// What the holder says of itself and of the server it runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HolderInfo {
    /// The holder's pid.
    pub pid: u32,
    /// When it started (seconds since the epoch).
    pub started_unix: f64,
    /// The server's pid.
    pub server_pid: u32,
    /// When the server started (seconds since the epoch).
    pub server_started_unix: f64,
    /// Servers that took the mounts over from a predecessor (after a crash, a kill or a
    /// planned restart).
    pub takeovers: u64,
    /// Mounts held.
    pub mounts: usize,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Largest message: a record holds a manifest (bounded by the registry client) and a
/// mount request.
const MAX_MESSAGE: usize = 4 << 20;
/// Descriptors of one mount at most (a tree or device FUSE connection: one).
const MAX_FDS: usize = 16;

fn send(sock: BorrowedFd<'_>, msg: &Message, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

fn recv(sock: BorrowedFd<'_>) -> std::io::Result<(Message, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            fds.extend(got);
        }
    }
    if r.bytes == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let msg = serde_json::from_slice(&buf[..r.bytes]).map_err(std::io::Error::other)?;
    Ok((msg, fds))
}

/// What a new server gets from the holder.
pub struct Inherited {
    /// The API socket, listening.
    pub listener: UnixListener,
    /// The mounts held, by key: the record and the descriptors.
    pub mounts: Vec<(String, String, Vec<OwnedFd>)>,
    /// Whether this server takes over from a predecessor.
    pub takeover: bool,
}

/// The server's connection to its holder.
pub struct HolderClient {
    sock: Mutex<OwnedFd>,
}

impl HolderClient {
    /// Connects to the holder of `home` and takes what it holds.
    pub fn hello(home: &Home) -> Result<(HolderClient, Inherited), String> {
        let path = home.root.join("holder.sock");
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| format!("holder socket: {e}"))?;
        let addr = rustix::net::SocketAddrUnix::new(&path).map_err(|e| e.to_string())?;
        rustix::net::connect_unix(&sock, &addr)
            .map_err(|e| format!("connecting to the holder at {}: {e}", path.display()))?;
        let io = |e: std::io::Error| format!("talking to the holder: {e}");
        send(
            sock.as_fd(),
            &Message::Hello {
                pid: std::process::id(),
            },
            &[],
        )
        .map_err(io)?;
        let (msg, mut fds) = recv(sock.as_fd()).map_err(io)?;
        let (Message::State { mounts, info }, Some(listener)) = (msg, fds.pop()) else {
            return Err("the holder answered hello with something else".into());
        };
        let mut held = Vec::with_capacity(mounts);
        for _ in 0..mounts {
            match recv(sock.as_fd()).map_err(io)? {
                (Message::Held { key, record }, fds) => held.push((key, record, fds)),
                (other, _) => return Err(format!("the holder sent {other:?}")),
            }
        }
        Ok((
            HolderClient {
                sock: Mutex::new(sock),
            },
            Inherited {
                listener: UnixListener::from(listener),
                mounts: held,
                takeover: info.takeovers > 0,
            },
        ))
    }

    fn call(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<Message, String> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        send(sock.as_fd(), msg, fds)
            .and_then(|()| recv(sock.as_fd()))
            .map(|(m, _)| m)
            .map_err(|e| format!("talking to the holder: {e}"))
    }

    /// Has the holder keep `fds` and `record` for the mount `key`.
    pub fn hold(&self, key: &str, record: String, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
        self.call(
            &Message::Hold {
                key: key.to_string(),
                record,
            },
            fds,
        )
        .map(|_| ())
    }

    /// Has the holder close what it keeps for `key`.
    pub fn release(&self, key: &str) -> Result<(), String> {
        self.call(
            &Message::Release {
                key: key.to_string(),
            },
            &[],
        )
        .map(|_| ())
    }

    /// Tells the holder this server stops for good.
    pub fn stopping(&self) -> Result<(), String> {
        self.call(&Message::Stopping, &[]).map(|_| ())
    }

    /// The holder's status.
    pub fn status(&self) -> Result<HolderInfo, String> {
        match self.call(&Message::Status, &[])? {
            Message::Info(i) => Ok(i),
            other => Err(format!("the holder sent {other:?}")),
        }
    }
}

/// What the holder keeps.
struct Holding {
    mounts: BTreeMap<String, (String, Vec<OwnedFd>)>,
    listener: OwnedFd,
    info: HolderInfo,
}

/// glibc's setting of the size from which `malloc` maps blocks of their own (see
/// `mallopt(3)`); setting it turns off the dynamic raise.
const MMAP_THRESHOLD: &str = "MALLOC_MMAP_THRESHOLD_";

/// Runs the holder of `home`: takes the root's lock, binds the API socket, runs `exe
/// daemon serve` and restarts it until it stops for good or a signal comes. Prints
/// `ready` on stdout once the first server serves (or `busy` if another daemon holds
/// the root).
pub fn run(home: Home, exe: PathBuf) -> Result<(), String> {
    home.create()
        .map_err(|e| format!("creating hoist's state root: {e}"))?;
    let lock_path = home.root.join("daemon.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    rustix::fs::flock(
        &lock_file,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .map_err(|_| {
        // Tells a starting client to wait for that daemon instead.
        println!("busy");
        format!(
            "another hoist daemon serves {} (HOIST_HOME); stop it with `hoist daemon stop`",
            home.root.display()
        )
    })?;
    let api = bind(&home.socket(), false)?;
    let holder_path = home.root.join("holder.sock");
    let control = bind(&holder_path, true)?;
    let holding = Arc::new(Mutex::new(Holding {
        mounts: BTreeMap::new(),
        listener: api,
        info: HolderInfo {
            pid: std::process::id(),
            started_unix: now_unix(),
            ..HolderInfo::default()
        },
    }));
    let stopping = Arc::new(AtomicBool::new(false));
    let server_pid = Arc::new(AtomicU32::new(0));
    {
        let (holding, stopping) = (holding.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("hoist-holder".into())
            .spawn(move || accept(control, holding, stopping))
            .map_err(|e| e.to_string())?;
    }
    // SIGTERM and SIGINT stop the daemon (the server unmounts everything); SIGHUP
    // restarts the server (a planned restart: the binary at the same path, new or not).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    {
        let (stopping, server_pid) = (stopping.clone(), server_pid.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                let pid = rustix::process::Pid::from_raw(server_pid.load(SeqCst) as i32);
                let Some(pid) = pid else { continue };
                let to = if sig == signal_hook::consts::SIGHUP {
                    tracing::info!("SIGHUP: restarting the server {}", pid.as_raw_nonzero());
                    rustix::process::Signal::Kill
                } else {
                    stopping.store(true, SeqCst);
                    rustix::process::Signal::Term
                };
                let _ = rustix::process::kill_process(pid, to);
            }
        });
    }
    tracing::info!(
        "hoist holder {} for {}",
        std::process::id(),
        home.root.display()
    );
    let mut first = true;
    let mut quick_deaths = 0u32;
    loop {
        let mut server = std::process::Command::new(&exe);
        server
            .args(["daemon", "serve"])
            .env("HOIST_HOME", &home.root);
        // fuser gives each FUSE thread a zeroed 16 MiB request buffer. glibc serves
        // a block that large by mmap (untouched pages cost nothing) only while its
        // mmap threshold is below it, and raises the threshold (to 32 MiB) when a large
        // block is freed; past that, the buffers come from the heap and their zeroing
        // touches every page: 16 MiB of RSS per thread (10 idle mounts took 208 MB,
        // and 47 MB with the threshold fixed). A fixed threshold stops the raise.
        if std::env::var_os(MMAP_THRESHOLD).is_none() {
            server.env(MMAP_THRESHOLD, (4u32 << 20).to_string());
        }
        let mut child = server
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {} daemon serve: {e}", exe.display()))?;
        server_pid.store(child.id(), SeqCst);
        {
            let mut h = holding.lock().unwrap_or_else(|e| e.into_inner());
            h.info.server_pid = child.id();
            h.info.server_started_unix = now_unix();
        }
        // The server says `ready` once it serves; the first time, so does the holder
        // (what a client that started it waits for).
        let ready = Arc::new(AtomicBool::new(false));
        let mut said = None;
        if let Some(out) = child.stdout.take() {
            let (tell, ready) = (first, ready.clone());
            said = Some(std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line == "ready" {
                        ready.store(true, SeqCst);
                        if tell {
                            println!("ready");
                            let _ = std::io::stdout().flush();
                        }
                    }
                }
            }));
        }
        first = false;
        let status = child
            .wait()
            .map_err(|e| format!("waiting for the server: {e}"))?;
        // Its output ends with it: whether it said `ready` is known once read to the end.
        if let Some(t) = said {
            let _ = t.join();
        }
        if stopping.load(SeqCst) {
            tracing::info!("the server stopped ({status}); the holder exits");
            break;
        }
        tracing::warn!(
            "the server {} exited ({status}); starting another",
            child.id()
        );
        {
            let mut h = holding.lock().unwrap_or_else(|e| e.into_inner());
            h.info.takeovers += 1;
        }
        // A server that fails to start, again and again, is restarted less often (up
        // to every 3.2 s); one that served is replaced at once, however soon it died.
        if ready.load(SeqCst) {
            quick_deaths = 0;
        } else {
            quick_deaths += 1;
            std::thread::sleep(Duration::from_millis(100 << quick_deaths.min(5)));
        }
    }
    let _ = std::fs::remove_file(home.socket());
    let _ = std::fs::remove_file(&holder_path);
    drop(lock_file);
    Ok(())
}

/// Binds a unix socket at `path` (replacing a stale one), mode 0600; `seqpacket` for the
/// holder's own.
fn bind(path: &Path, seqpacket: bool) -> Result<OwnedFd, String> {
    let _ = std::fs::remove_file(path);
    let named = |e: std::io::Error| format!("binding {}: {e}", path.display());
    let fd = if seqpacket {
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| named(e.into()))?;
        let addr = rustix::net::SocketAddrUnix::new(path).map_err(|e| named(e.into()))?;
        rustix::net::bind_unix(&sock, &addr).map_err(|e| named(e.into()))?;
        rustix::net::listen(&sock, 16).map_err(|e| named(e.into()))?;
        sock
    } else {
        OwnedFd::from(UnixListener::bind(path).map_err(named)?)
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(fd)
}

/// Serves the servers' connections, one at a time (there is one server at a time).
fn accept(control: OwnedFd, holding: Arc<Mutex<Holding>>, stopping: Arc<AtomicBool>) {
    loop {
        let Ok(conn) = rustix::net::accept_with(&control, rustix::net::SocketFlags::CLOEXEC) else {
            continue;
        };
        if let Err(e) = serve(conn.as_fd(), &holding, &stopping) {
            tracing::debug!("server connection: {e}");
        }
    }
}

fn serve(
    conn: BorrowedFd<'_>,
    holding: &Mutex<Holding>,
    stopping: &AtomicBool,
) -> std::io::Result<()> {
    loop {
        let (msg, fds) = recv(conn)?;
        let mut h = holding.lock().unwrap_or_else(|e| e.into_inner());
        match msg {
            Message::Hello { pid } => {
                tracing::info!("server {pid} takes {} mounts", h.mounts.len());
                let info = HolderInfo {
                    mounts: h.mounts.len(),
                    ..h.info.clone()
                };
                send(
                    conn,
                    &Message::State {
                        mounts: h.mounts.len(),
                        info,
                    },
                    &[h.listener.as_fd()],
                )?;
                for (key, (record, fds)) in &h.mounts {
                    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    send(
                        conn,
                        &Message::Held {
                            key: key.clone(),
                            record: record.clone(),
                        },
                        &fds,
                    )?;
                }
                continue;
            }
            Message::Hold { key, record } => {
                h.mounts.insert(key, (record, fds));
            }
            Message::Release { key } => {
                h.mounts.remove(&key);
            }
            Message::Stopping => stopping.store(true, SeqCst),
            Message::Status => {
                let info = HolderInfo {
                    mounts: h.mounts.len(),
                    ..h.info.clone()
                };
                send(conn, &Message::Info(info), &[])?;
                continue;
            }
            other => tracing::warn!("unexpected from the server: {other:?}"),
        }
        send(conn, &Message::Done, &[])?;
    }
}
