//! The command lines containerd's runc shims (go-runc) produce, parsed as runc parses them.

use clap::Parser;

use super::args::{LogFormat, OciCommand};
use super::*;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: OciCommand,
}

fn parse(line: &str) -> Cli {
    let argv = std::iter::once("kata-runtime").chain(line.split_whitespace());
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{line}: {e}"))
}

const GLOBAL: &str = "--root /run/containerd/runc/default --log /b/log.json --log-format json --systemd-cgroup";

#[test]
fn go_runc_create() {
    let cli = parse(&format!(
        "{GLOBAL} create --bundle /b --pid-file /b/init.pid --console-socket /tmp/pty.sock --no-pivot --no-new-keyring c1"
    ));
    assert_eq!(cli.global.root, Path::new("/run/containerd/runc/default"));
    assert_eq!(cli.global.log.as_deref(), Some(Path::new("/b/log.json")));
    assert_eq!(cli.global.log_format, LogFormat::Json);
    let OciCommand::Create(c) = cli.command else { panic!("not create") };
    assert_eq!((c.bundle.as_path(), c.id.as_str()), (Path::new("/b"), "c1"));
    assert_eq!(c.pid_file.as_deref(), Some(Path::new("/b/init.pid")));
    assert_eq!(c.console_socket.as_deref(), Some(Path::new("/tmp/pty.sock")));
    assert!(c.no_pivot && c.no_new_keyring);
}

#[test]
fn go_runc_lifecycle_commands() {
    assert!(matches!(parse(&format!("{GLOBAL} start c1")).command, OciCommand::Start { id } if id == "c1"));
    assert!(matches!(parse(&format!("{GLOBAL} state c1")).command, OciCommand::State { id } if id == "c1"));
    assert!(matches!(
        parse(&format!("{GLOBAL} kill --all c1 9")).command,
        OciCommand::Kill { all: true, id, signal } if id == "c1" && signal == "9"
    ));
    assert!(matches!(
        parse(&format!("{GLOBAL} kill c1")).command,
        OciCommand::Kill { all: false, signal, .. } if signal == "SIGTERM"
    ));
    assert!(matches!(
        parse(&format!("{GLOBAL} delete --force c1")).command,
        OciCommand::Delete { force: true, id } if id == "c1"
    ));
    assert!(matches!(
        parse(&format!("{GLOBAL} ps --format json c1")).command,
        OciCommand::Ps { format, id, .. } if format == "json" && id == "c1"
    ));
    assert!(matches!(
        parse(&format!("{GLOBAL} update --resources - c1")).command,
        OciCommand::Update(u) if u.resources.as_deref() == Some(Path::new("-")) && u.id == "c1"
    ));
    assert!(matches!(
        parse(&format!("{GLOBAL} update --memory 512m --cpu-quota -1 --pids-limit 10 c1")).command,
        OciCommand::Update(u) if u.memory.as_deref() == Some("512m") && u.cpu_quota == Some(-1) && u.pids_limit == Some(10)
    ));
    assert!(matches!(
        parse(&format!("{GLOBAL} events --stats c1")).command,
        OciCommand::Events { stats: true, id, .. } if id == "c1"
    ));
    assert!(matches!(parse(&format!("{GLOBAL} pause c1")).command, OciCommand::Pause { .. }));
    assert!(matches!(parse(&format!("{GLOBAL} resume c1")).command, OciCommand::Resume { .. }));
    assert!(matches!(
        parse(&format!("{GLOBAL} events --interval 10s --stats c1")).command,
        OciCommand::Events { stats: true, .. }
    ));
}

#[test]
fn global_flags_may_follow_the_command() {
    let cli = parse("state --root /r c1");
    assert_eq!(cli.global.root, Path::new("/r"));
    assert_eq!(parse("list").global.root, Path::new(args::DEFAULT_ROOT));
}

#[test]
fn go_runc_exec_and_the_inline_form() {
    let cli =
        parse(&format!("{GLOBAL} exec --process /tmp/p.json --detach --pid-file /b/e.pid --console-socket /tmp/s c1"));
    let OciCommand::Exec(e) = cli.command else { panic!("not exec") };
    assert_eq!(e.process.as_deref(), Some(Path::new("/tmp/p.json")));
    assert!(e.detach && e.command.is_empty());
    assert_eq!(e.pid_file.as_deref(), Some(Path::new("/b/e.pid")));

    let OciCommand::Exec(e) = parse("exec -t -e A=1 --cwd /tmp c1 sh -c id").command else { panic!("not exec") };
    assert_eq!(e.command, ["sh", "-c", "id"]);
    let p = inline_process(&e);
    assert_eq!(p["args"], serde_json::json!(["sh", "-c", "id"]));
    assert_eq!(p["terminal"], true);
    assert_eq!(p["cwd"], "/tmp");
    assert!(p["env"].as_array().is_some_and(|env| env.iter().any(|v| v == "A=1")));
}

#[test]
fn run_takes_create_flags_and_detach() {
    let OciCommand::Run { create, detach } = parse("run -d -b /b c1").command else { panic!("not run") };
    assert!(detach);
    assert_eq!((create.bundle.as_path(), create.id.as_str()), (Path::new("/b"), "c1"));
}

#[test]
fn signals_by_number_or_name() {
    assert_eq!(parse_signal("9").unwrap(), 9);
    assert_eq!(parse_signal("KILL").unwrap(), 9);
    assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
    assert_eq!(parse_signal("sigusr1").unwrap(), 10);
    assert_eq!(parse_signal("hup").unwrap(), 1);
    for bad in ["0", "65", "SIGNOPE", "-9", ""] {
        assert!(parse_signal(bad).is_err(), "{bad}");
    }
}

#[test]
fn errors_are_logged_as_runc_logs_them() {
    let line = log_line(LogFormat::Json, "container \"c1\" does not exist", "2024-01-01T00:00:00Z");
    assert!(line.ends_with('\n'));
    let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(v["level"], "error");
    assert_eq!(v["msg"], "container \"c1\" does not exist");
    assert_eq!(v["time"], "2024-01-01T00:00:00Z");
    assert!(log_line(LogFormat::Text, "x", "t").contains("level=error"));
}

#[test]
fn commands_on_a_missing_container_say_so() {
    let root = tempfile::tempdir().unwrap();
    let err = call(root.path(), "nope", &Request::Start).unwrap_err().to_string();
    assert!(err.contains("container nope does not exist"), "{err}");
    assert!(delete(root.path(), "nope", true).is_ok());
    assert!(delete(root.path(), "nope", false).is_err());
    assert!(call(root.path(), "../etc", &Request::Start).is_err());
}

#[test]
fn the_features_name_this_runtime() {
    let f = features();
    assert_eq!(f["ociVersionMin"], "1.0.0");
    assert_eq!(f["annotations"]["io.katacontainers.runtime"], "kata-rs");
}
