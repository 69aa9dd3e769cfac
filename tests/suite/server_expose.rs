//! `gpt2 serve` fit to expose: API keys from a file and the environment, CORS, the served model's
//! name, chat roles, the access log and `X-Request-Id`, latency histograms.

use crate::common;

use common::server::{agent, serve_command, Server, FIXTURE};
use serde_json::{json, Value};

fn status_with_key(server: &Server, key: Option<&str>) -> u16 {
    let mut req = agent().get(&server.url("/v1/models"));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn keys_come_from_a_file_the_environment_and_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("keys");
    std::fs::write(&file, "# team keys\nkey-one\n\n  key-two  \n").unwrap();
    let dir = common::fixture_dir(FIXTURE);
    let mut cmd = serve_command(&[
        "--model",
        dir.to_str().unwrap(),
        "--api-key-file",
        file.to_str().unwrap(),
        "--api-key",
        "key-three",
        "--no-access-log",
    ]);
    cmd.env("GPT2_API_KEY", "key-four, key-five");
    let server = Server::spawn(cmd);
    for k in ["key-one", "key-two", "key-three", "key-four", "key-five"] {
        assert_eq!(status_with_key(&server, Some(k)), 200, "{k}");
    }
    assert_eq!(status_with_key(&server, Some("key-on")), 401);
    assert_eq!(status_with_key(&server, Some("key-one ")), 200);
    assert_eq!(status_with_key(&server, None), 401);
    assert_eq!(server.get("/health").0, 200);
    // An empty key file is an error at start, not a server open to anyone.
    std::fs::write(&file, "# nothing\n").unwrap();
    let out = serve_command(&[
        "--model",
        dir.to_str().unwrap(),
        "--api-key-file",
        file.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no keys in the file"));
}

#[test]
fn the_served_name_is_the_models_and_chat_roles_are_checked() {
    let dir = common::fixture_dir(FIXTURE);
    let server = Server::start(&["--model", dir.to_str().unwrap(), "--no-access-log"]);
    let (_, m) = server.get("/v1/models");
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(
        m["data"][0]["id"], FIXTURE,
        "the directory's name, not its path"
    );
    let (s, v) = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]}),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[1].role"),
        "{v}"
    );
}

#[test]
fn cors_is_opt_in() {
    let origin = "http://example.org";
    let preflight = |server: &Server| {
        agent()
            .request("OPTIONS", &server.url("/v1/completions"))
            .set("Origin", origin)
            .set("Access-Control-Request-Method", "POST")
            .set(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .call()
            .ok()
            .and_then(|r| r.header("access-control-allow-origin").map(str::to_owned))
    };
    let server = Server::fixture(&["--cors-origin", origin, "--no-access-log"]);
    assert_eq!(preflight(&server).as_deref(), Some(origin));
    let r = agent()
        .get(&server.url("/v1/models"))
        .set("Origin", origin)
        .call()
        .unwrap();
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    let other = agent()
        .get(&server.url("/v1/models"))
        .set("Origin", "http://elsewhere.example")
        .call()
        .unwrap();
    assert_eq!(other.header("access-control-allow-origin"), None);
    let closed = Server::fixture(&["--no-access-log"]);
    assert_eq!(preflight(&closed), None);
}

#[test]
fn each_request_is_logged_with_its_id_and_timings() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("access.log");
    let server = Server::fixture(&["--log-file", log.to_str().unwrap()]);
    let r = agent()
        .post(&server.url("/v1/completions"))
        .set("Content-Type", "application/json")
        .set("X-Request-Id", "client-42")
        .send_string(&json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0}).to_string())
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("client-42"));
    let (s, _) = server.post("/v1/completions", &json!({"prompt": 5}));
    assert_eq!(s, 400);
    let events = server.stream(
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 3, "stream": true}),
    );
    assert!(!events.is_empty());
    let generated = agent().get(&server.url("/health")).call().unwrap();
    let id = generated.header("x-request-id").unwrap().to_owned();
    assert!(id.starts_with("req-"), "{id}");
    // Lines are written by the log's own thread: wait for all four.
    let t = std::time::Instant::now();
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 4 || t.elapsed().as_secs() > 10 {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 4, "{lines:?}");
    let first = lines
        .iter()
        .find(|l| l["request_id"] == "client-42")
        .unwrap();
    assert_eq!(first["status"], 200);
    assert_eq!(first["completion_tokens"], 5);
    assert_eq!(first["finish_reasons"], json!(["length"]));
    for k in ["queue_s", "ttft_s", "total_s"] {
        assert!(first[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {first}");
    }
    assert!(lines
        .iter()
        .any(|l| l["status"] == 400 && l["path"] == "/v1/completions"));
    assert!(lines.iter().any(|l| l["completion_tokens"] == 3));
    assert!(lines
        .iter()
        .any(|l| l["request_id"] == id.as_str() && l["path"] == "/health"));
    assert!(server.metric("gpt2_queue_time_seconds_count") >= 2.0);
    assert!(server.metric("gpt2_e2e_request_latency_seconds_count") >= 2.0);
}
