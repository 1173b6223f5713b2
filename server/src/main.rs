//! `bridge-server`: the command line. Each subcommand is a thin shell over the library.

use std::io::{BufRead, IsTerminal};

use anyhow::Context;
use bridge_server::config::{DatabaseArgs, ServeArgs, ServerConfig};
use bridge_server::db::Database;
use bridge_server::dongle_tokens::{self, KeyRing, RotateOptions};
use bridge_server::users::{self, Email, Role};
use bridge_server::{app, auth, email, telemetry};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// The remote CAN bridge server.
///
/// It keeps accounts, pairs dongles, configures them, runs commands on them and relays CAN frames
/// between grouped dongles. All state lives in PostgreSQL: DATABASE_URL, or a private cluster that the
/// server runs in its data folder.
#[derive(Parser)]
#[command(name = "bridge-server", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (and apply pending migrations first, unless --no-migrate).
    Serve(Box<ServeArgs>),
    /// Apply the database migrations embedded in this binary. Running it twice is a no-op.
    Migrate {
        /// The PostgreSQL database to migrate.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Administration from the server's own machine.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// List the mail still queued in the outbox, with its links (for development without SMTP).
    Outbox {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The dongle-token master keys (DONGLE_TOKEN_MASTER_KEY_V<n>, base64 of 32 bytes).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (bridge-server.1 and one per subcommand) into a folder, for packagers.
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-encrypt every stored dongle token with key version N, in batches; idempotent and resumable.
    Rotate {
        /// The key version to move every token to (its variable must be set).
        #[arg(long)]
        to: i32,
        /// Check that every row decrypts and count them, without writing.
        #[arg(long)]
        dry_run: bool,
        /// Rows per committed batch.
        #[arg(long, default_value_t = 500)]
        batch_size: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// How many stored tokens use each key version.
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user (e.g. the first super_admin). The password is asked for on the terminal, or read
    /// from the first line of standard input when that is not a terminal.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum, default_value = "user")]
        role: RoleArg,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    User,
    /// SPEC spells it `super_admin`; `super-admin` is accepted too.
    #[value(name = "super_admin", alias = "super-admin")]
    SuperAdmin,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging();
    telemetry::install_crypto_provider();
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate { database_url } => migrate(&database_url).await,
        Command::Admin {
            command:
                AdminCommand::CreateUser {
                    email,
                    role,
                    database,
                },
        } => create_user(&email, role, &database).await,
        Command::Outbox { database } => outbox(&database).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bridge-server",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => {
            std::fs::create_dir_all(&out)
                .with_context(|| format!("could not create {}", out.display()))?;
            clap_mangen::generate_to(Cli::command(), &out).with_context(|| {
                format!("could not write the manual pages into {}", out.display())
            })?;
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    to,
                    dry_run,
                    batch_size,
                    database,
                },
        } => keys_rotate(to, dry_run, batch_size, &database).await,
        Command::Keys {
            command: KeysCommand::Status { database },
        } => keys_status(&database).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let database = Database::open(&args.database, !args.no_migrate).await?;
    if args.no_migrate && !bridge_server::db::is_up_to_date(&database.pool).await? {
        tracing::warn!("the database lacks migrations of this version: /readyz answers 503");
    }
    let mut config = ServerConfig::from_args(&args);
    config.dongle_keys = load_keys(&args.database)?;
    if config.dev_mode {
        tracing::warn!("development mode: dangerous dongle commands (factory-reset) may be run");
    }
    let result = app::serve(config, database.pool.clone(), shutdown_signal())
        .await
        .context("the server could not start");
    database.close().await?;
    result
}

/// The dongle-token keys from the environment, or the development key in the data folder.
fn load_keys(database: &DatabaseArgs) -> anyhow::Result<KeyRing> {
    let (keys, dev) = KeyRing::from_env_or_dev(&database.data_dir)
        .context("could not load the dongle-token keys")?;
    if dev {
        tracing::warn!(
            folder = %database.data_dir.display(),
            "no DONGLE_TOKEN_MASTER_KEY_V<n> is set: using the development key kept in the data folder \
             (file {}); set the variables in production",
            dongle_tokens::DEV_KEY_FILE
        );
    }
    Ok(keys)
}

async fn keys_rotate(
    to: i32,
    dry_run: bool,
    batch_size: i64,
    database: &DatabaseArgs,
) -> anyhow::Result<()> {
    let keys = load_keys(database)?;
    let database = Database::open(database, true).await?;
    let report = dongle_tokens::rotate(
        &database.pool,
        &keys,
        RotateOptions {
            to,
            dry_run,
            batch_size,
            max_batches: None,
        },
    )
    .await
    .context("the rotation stopped; run it again to continue")?;
    database.close().await?;
    if dry_run {
        println!(
            "dry run: {} token(s) would be re-encrypted with key version {to}",
            report.rows
        );
    } else {
        println!(
            "re-encrypted {} token(s) with key version {to} in {} batch(es); {} left on other versions",
            report.rows, report.batches, report.remaining
        );
    }
    if !report.skipped.is_empty() {
        for id in &report.skipped {
            println!("does not decrypt with any key given: dongle {id}");
        }
        anyhow::bail!(
            "{} token(s) do not decrypt with any key given (listed above) and were left as they are: \
             give the key they were sealed with (DONGLE_TOKEN_MASTER_KEY_V<n>) and run again, or \
             force-unpair those dongles so that they pair anew",
            report.skipped.len()
        );
    }
    Ok(())
}

async fn keys_status(database: &DatabaseArgs) -> anyhow::Result<()> {
    let keys = load_keys(database)?;
    let database = Database::open(database, true).await?;
    let rows = dongle_tokens::status(&database.pool).await?;
    database.close().await?;
    println!(
        "configured key versions: {:?}; new tokens use {}",
        keys.versions(),
        keys.write_version()
    );
    if rows.is_empty() {
        println!("no stored dongle tokens");
    }
    for (version, count) in rows {
        println!("key version {version}: {count} token(s)");
    }
    Ok(())
}

/// Resolves at Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let pool = bridge_server::db::connect(database_url, 2).await?;
    let applied = bridge_server::db::migrate(&pool)
        .await
        .context("migrate failed")?;
    if applied.is_empty() {
        println!("the database is up to date: no migration to apply");
    } else {
        for m in &applied {
            println!("applied {:04} {}", m.version, m.description);
        }
        println!("{} migration(s) applied", applied.len());
    }
    Ok(())
}

async fn create_user(email: &str, role: RoleArg, database: &DatabaseArgs) -> anyhow::Result<()> {
    let email = Email::parse(email).context("--email is not a valid email address")?;
    let password = read_password().context("could not read the password")?;
    auth::password::check_policy(&password).context("the password is refused")?;
    let hash = auth::password::hash_async(password, Default::default())
        .await
        .context("could not hash the password")?;
    let role = match role {
        RoleArg::User => Role::User,
        RoleArg::SuperAdmin => Role::SuperAdmin,
    };
    let database = Database::open(database, true).await?;
    let created = users::insert(&database.pool, &email, &hash, role)
        .await
        .context("could not create the user")?;
    // An administrator made the account by hand, so the address counts as confirmed.
    if let Some(user) = &created {
        users::mark_email_verified(&database.pool, user.id).await?;
    }
    database.close().await?;
    match created {
        Some(user) => {
            println!(
                "created {} ({:?}) with id {}",
                user.email, user.role, user.id
            );
            Ok(())
        }
        None => anyhow::bail!("a user with the email {} already exists", email.as_str()),
    }
}

/// The password from the terminal (not echoed, asked twice), or the first line of stdin.
fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password again: ")?;
        anyhow::ensure!(first == again, "the two passwords differ");
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

async fn outbox(database: &DatabaseArgs) -> anyhow::Result<()> {
    let database = Database::open(database, true).await?;
    let queued = email::outbox::list_queued(&database.pool)
        .await
        .context("could not read the outbox")?;
    if queued.is_empty() {
        println!("no queued mail");
    }
    for mail in &queued {
        // The link is printed here, and only here: this is how a developer without SMTP reads the mail.
        let link = mail
            .payload
            .get("link")
            .and_then(|l| l.as_str())
            .unwrap_or("-");
        println!(
            "{}  {}  to {}  {}  attempts {}\n    {}",
            mail.created_at.format("%Y-%m-%d %H:%M:%S"),
            mail.id,
            mail.to_email,
            mail.template,
            mail.attempts,
            link
        );
    }
    database.close().await?;
    Ok(())
}
