//! What the dashboard's browser tests share: headless Chromium driven through chromedriver (started by
//! the test on a free port), and the real parts around the server: simulated dongles on their own
//! virtual CAN buses and agents running the real daemon in this process, as two workstations would
//! (`bridge-rig`'s parts, which the demo and the benchmarks run too).
//!
//! The tests run only with the cargo feature `browser-tests` (scripts/test turns it on when Debian's
//! chromium and chromium-driver are installed); without it they are reported as ignored. Each test
//! saves a screenshot of its last page as `target/web-screenshots/<test>.png`, and of the page it
//! was on when a wait timed out as `<test>-failed.png`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bridge_rig::{AgentPart, DonglePart, UserClient};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::common::{PASSWORD, TestApp, TestClient};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long a wait for something on a page lasts.
pub const WAIT: Duration = Duration::from_secs(20);

/// Where screenshots go: `target/web-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("web-screenshots")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A headless Chromium with its own profile, driven through its own chromedriver.
pub struct Browser {
    pub client: Client,
    pub base: String,
    /// The test's name: its screenshots are named after it.
    pub name: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a browser session for the server at `base`.
    pub async fn start(base: &str, name: &str) -> Self {
        Self::start_with(base, name, true).await
    }

    /// The same, with page scripts on or off.
    pub async fn start_with(base: &str, name: &str, javascript: bool) -> Self {
        for (path, package) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: install Debian's {package} (apt-get install -y chromium chromium-driver)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let webdriver = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            "--disable-default-apps".into(),
            "--password-store=basic".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        if !javascript {
            args.push("--blink-settings=scriptEnabled=false".into());
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let mut client = None;
        for _ in 0..3 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&webdriver)
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(e) => {
                    eprintln!("a browser session did not start ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let client = client.expect("a browser session starts");
        Self {
            client,
            base: base.to_string(),
            name: name.to_string(),
            driver,
            _profile: profile,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn goto(&self, path: &str) {
        self.client.goto(&self.url(path)).await.unwrap();
    }

    /// The path (and query) of the page shown.
    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Saves a screenshot of the whole page as `target/web-screenshots/<name>.png` (the window grows
    /// to the page's height for it, then comes back).
    pub async fn screenshot_as(&self, name: &str) {
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let size = self.client.get_window_size().await.ok();
        let height = self
            .client
            .execute("return document.documentElement.scrollHeight;", vec![])
            .await
            .ok()
            .and_then(|v| v.as_u64());
        let grown = match (size, height) {
            (Some((w, h)), Some(page)) if page + 140 > h => {
                let _ = self
                    .client
                    .set_window_size(w as u32, (page + 140).min(8000) as u32)
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                Some((w, h))
            }
            _ => None,
        };
        let shot = self.client.screenshot().await;
        if let Some((w, h)) = grown {
            let _ = self.client.set_window_size(w as u32, h as u32).await;
        }
        match shot {
            Ok(png) => {
                let path = dir.join(format!("{name}.png"));
                std::fs::write(&path, png).unwrap();
                eprintln!("screenshot: {}", path.display());
            }
            Err(e) => eprintln!("no screenshot: {e}"),
        }
    }

    /// The test's screenshot of its last page.
    pub async fn screenshot(&self) {
        self.screenshot_as(&self.name.clone()).await;
    }

    async fn fail(&self, what: &str) -> ! {
        self.screenshot_as(&format!("{}-failed", self.name)).await;
        let path = self.path().await;
        let text = self.client.find(Locator::Css("main")).await.ok();
        let text = match text {
            Some(main) => main.text().await.unwrap_or_default(),
            None => String::new(),
        };
        panic!("{what} (page {path}):\n{text}");
    }

    /// Waits until `check` holds; on timeout, saves a screenshot and fails naming `what`.
    pub async fn wait_until<F, Fut>(&self, what: &str, within: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        loop {
            if check().await {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out waiting for {what}")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the first element matching `css`, if there is one.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.ok(),
            Err(_) => None,
        }
    }

    /// Waits for an element matching `css` whose text contains `needle`; answers its text.
    pub async fn wait_text(&self, css: &str, needle: &str) -> String {
        self.wait_text_within(css, needle, WAIT).await
    }

    pub async fn wait_text_within(&self, css: &str, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(elements) = self.client.find_all(Locator::Css(css)).await {
                for e in elements {
                    if let Ok(text) = e.text().await
                        && text.contains(needle)
                    {
                        return text;
                    }
                }
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out waiting for {css:?} to show {needle:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the page's path starts with `prefix`.
    pub async fn wait_path(&self, prefix: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.path().await.starts_with(prefix) {
                // The new page's scripts run after it is parsed.
                let _ = self.client.find(Locator::Css("main h1")).await;
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out waiting to reach {prefix}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` into the field `css` (cleared first).
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// The element `css`, waiting for it to exist.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                return e;
            }
            if Instant::now() > deadline {
                self.fail(&format!("no element {css:?}")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// Clicks `css` and accepts the confirmation it asks for.
    pub async fn click_and_confirm(&self, css: &str) {
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.client.accept_alert().await.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("{css} asked for no confirmation")).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn select(&self, css: &str, value: &str) {
        self.find(css).await.select_by_value(value).await.unwrap();
    }

    /// Runs a script and answers its value.
    pub async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Signs in through the sign-in page and waits for the dongles.
    pub async fn sign_in(&self, email: &str, password: &str) {
        self.goto("/login").await;
        self.fill("#login-email", email).await;
        self.fill("#login-password", password).await;
        self.click("#login-form button[type=submit]").await;
        self.wait_path("/dongles").await;
    }

    /// Checks what every page must have: a label (or accessible name) for every visible control, a
    /// main heading, and no horizontal scrolling of the page itself.
    pub async fn check_page(&self) {
        let unlabelled = self
            .js(
                "return Array.from(document.querySelectorAll('input, select, textarea'))
                   .filter(e => e.type !== 'hidden')
                   .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                                && !e.getAttribute('aria-labelledby'))
                   .map(e => e.name || e.id || e.outerHTML);",
            )
            .await;
        assert_eq!(
            unlabelled,
            json!([]),
            "controls without a label on {}",
            self.path().await
        );
        let h1 = self
            .js("return document.querySelectorAll('main h1').length;")
            .await;
        assert_eq!(h1, json!(1), "one main heading on {}", self.path().await);
        let overflow = self
            .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
            .await;
        assert!(
            overflow.as_i64().unwrap_or(0) <= 0,
            "the page scrolls sideways by {overflow} px on {}",
            self.path().await
        );
    }

    /// Makes the window phone-sized (375 px wide) or back to a desktop's.
    pub async fn phone(&self, on: bool) {
        let (w, h) = if on { (375, 812) } else { (1280, 1000) };
        self.client.set_window_size(w, h).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Ends the session and chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}

/// An agent of the user serving `dongle`, logged in and running, as a workstation runs it.
pub async fn agent(dir: &Path, base: &str, name: &str, dongle: &DonglePart) -> AgentPart {
    let mut agent = AgentPart::login(dir, base, EMAIL, PASSWORD, name, dongle.plan.clone())
        .await
        .expect("the agent logs in");
    agent.start();
    agent
}

/// A verified user made in the database, with a logged-in API client.
pub async fn user(app: &TestApp, email: &str) -> TestClient {
    let (client, _) = app.logged_in(email, bridge_server::users::Role::User).await;
    client
}

/// Pairs `dongle` to the user through the API with the PIN it shows, and waits until its agent serves
/// it as owned; answers its id.
pub async fn pair(user: &UserClient, dongle: &DonglePart) -> Uuid {
    let id = bridge_rig::pair(user, dongle)
        .await
        .expect("the dongle pairs");
    id.parse().expect("a dongle id is a UUID")
}

/// A user with one simulated dongle served by a running agent, and a browser signed in as the user.
pub struct OneDongle {
    pub app: TestApp,
    pub client: TestClient,
    /// The same user through `bridge-rig`'s client, which pairs dongles.
    pub user: UserClient,
    pub dongle: DonglePart,
    pub agent: AgentPart,
    pub browser: Browser,
    pub dir: tempfile::TempDir,
}

pub const EMAIL: &str = "tech@example.com";

impl OneDongle {
    pub async fn start(app: TestApp, test: &str) -> Self {
        let client = user(&app, EMAIL).await;
        let user = UserClient::login(&app.base, EMAIL, PASSWORD).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dongle = DonglePart::usb(&dir.path().join("dongle"), "bench")
            .await
            .unwrap();
        let agent = agent(&dir.path().join("agent"), &app.base, "bench-pc", &dongle).await;
        bridge_rig::wait_dongle(&user, &dongle.device_id, |d| d["online"] == true)
            .await
            .unwrap();
        let browser = Browser::start(&app.base, test).await;
        browser.sign_in(EMAIL, PASSWORD).await;
        Self {
            app,
            client,
            user,
            dongle,
            agent,
            browser,
            dir,
        }
    }

    pub async fn stop(mut self) {
        self.browser.close().await;
        self.agent.stop().await.expect("the agent stops");
        self.dongle.sim.shutdown().await;
        self.app.stop().await;
    }
}

/// A user with two paired dongles on two buses, each served by its own agent (two workstations), and
/// a browser signed in as the user.
pub struct TwoSides {
    pub app: TestApp,
    pub client: TestClient,
    pub user: UserClient,
    pub a: DonglePart,
    pub b: DonglePart,
    pub agent_a: AgentPart,
    pub agent_b: AgentPart,
    pub a_id: Uuid,
    pub b_id: Uuid,
    pub browser: Browser,
    pub dir: tempfile::TempDir,
}

impl TwoSides {
    pub async fn start(app: TestApp, test: &str) -> Self {
        let client = user(&app, EMAIL).await;
        let user = UserClient::login(&app.base, EMAIL, PASSWORD).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = DonglePart::usb(&dir.path().join("dongle-a"), "vehicle")
            .await
            .unwrap();
        // Side B on the LAN, as in the demo: the side that a test stops and starts again.
        let b = DonglePart::lan(&dir.path().join("dongle-b"), "bench")
            .await
            .unwrap();
        let agent_a = agent(&dir.path().join("agent-a"), &app.base, "workstation-a", &a).await;
        let agent_b = agent(&dir.path().join("agent-b"), &app.base, "workstation-b", &b).await;
        let a_id = pair(&user, &a).await;
        let b_id = pair(&user, &b).await;
        let browser = Browser::start(&app.base, test).await;
        browser.sign_in(EMAIL, PASSWORD).await;
        Self {
            app,
            client,
            user,
            a,
            b,
            agent_a,
            agent_b,
            a_id,
            b_id,
            browser,
            dir,
        }
    }

    pub async fn stop(mut self) {
        self.browser.close().await;
        self.agent_a.stop().await.expect("agent A stops");
        self.agent_b.stop().await.expect("agent B stops");
        self.a.sim.shutdown().await;
        self.b.sim.shutdown().await;
        self.app.stop().await;
    }
}

/// A classic frame for the virtual buses.
pub fn frame(id: u16, data: &[u8]) -> dongle_sim::Frame {
    dongle_sim::Frame::classic(
        firmware_proto::ids::CanId::standard(id).expect("an 11-bit id"),
        data,
    )
    .expect("8 bytes at most")
}
