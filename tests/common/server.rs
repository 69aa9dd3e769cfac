//! `gpt2 serve` as a child process on an ephemeral loopback port, for the server tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The fixture the server tests run (n_positions 64: a prompt can fill the context with few tokens).
pub const FIXTURE: &str = "full-vocab-f16";

/// A server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

/// `gpt2 serve ARGS` on an ephemeral loopback port, offline, two threads; not started.
pub fn serve_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpt2"));
    c.arg("serve")
        .args(["--host", "127.0.0.1", "--port", "0", "--threads", "2"])
        .args(args)
        .env("HF_HUB_OFFLINE", "1");
    c
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::spawn(serve_command(args))
    }

    /// Start `cmd` (a [`serve_command`], perhaps with more environment) and wait for its address.
    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting gpt2 serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("reading the server's address");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Server { child, base }
    }

    pub fn fixture(extra: &[&str]) -> Server {
        let dir = super::fixture_dir(FIXTURE);
        let mut args = vec![
            "--model",
            dir.to_str().unwrap(),
            "--served-model-name",
            "fixture",
        ];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST JSON; the status and the body as JSON.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), &[])
    }

    pub fn post_raw(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = agent()
            .post(&self.url(path))
            .set("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match req.send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match agent().get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// A streaming POST: every `data:` payload, `[DONE]` included as a string.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let resp = agent()
            .post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        let mut out = Vec::new();
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(d) = line.strip_prefix("data: ") {
                out.push(serde_json::from_str(d).unwrap_or(Value::String(d.to_owned())));
            } else {
                assert!(line.is_empty(), "unexpected SSE line {line:?}");
            }
        }
        assert_eq!(
            out.last(),
            Some(&json!("[DONE]")),
            "the stream ends with [DONE]"
        );
        out
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

impl Server {
    pub fn addr(&self) -> &str {
        self.base.strip_prefix("http://").unwrap()
    }

    /// SIGTERM, then the exit status if the process ends within `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        wait_for(&mut self.child, within)
    }
}

/// The child's exit status if it ends within `within`.
pub fn wait_for(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
