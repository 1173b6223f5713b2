//! The OpenAPI document is generated from the code and stays true: every documented operation exists,
//! and a representative call of each answers with a status the document lists, in the documented shape.

use crate::common;

use common::{read, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

/// (method, path with ids filled in, documented statuses) of every operation in the document.
fn operations(doc: &Value) -> Vec<(Method, String, Vec<u16>)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let statuses = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse::<u16>().expect("numeric status"))
                .collect();
            let concrete = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
            ops.push((method, concrete, statuses));
        }
    }
    ops
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn every_documented_operation_exists_and_answers_as_documented(pool: PgPool) {
    let app = spawn_app(pool).await;
    let anon = app.client();
    let doc = read(anon.get("/openapi.json").await).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(
        doc.json["openapi"].as_str().unwrap().starts_with("3."),
        "OpenAPI 3"
    );
    let ops = operations(&doc.json);
    assert!(ops.len() >= 29, "{} operations", ops.len());
    let generated = serde_json::to_value(bridge_server::routes::openapi()).unwrap();
    assert_eq!(
        doc.json["paths"], generated["paths"],
        "the served document is the generated one"
    );
    for (path, expected) in [
        ("/api/v1/auth/signup", "post"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/auth/me", "get"),
        ("/api/v1/auth/csrf", "get"),
        ("/api/v1/auth/sessions/{id}", "delete"),
        ("/api/v1/admin/users/{id}/disable", "post"),
        ("/api/v1/admin/audit-logs", "get"),
        ("/readyz", "get"),
        ("/api/v1/agents/register", "post"),
        ("/api/v1/agents", "get"),
        ("/api/v1/agents/{id}/tokens", "delete"),
        ("/api/v1/agents/heartbeat", "post"),
        ("/api/v1/agents/devices/report", "post"),
        ("/api/v1/dongles", "get"),
        ("/api/v1/dongles/{id}", "get"),
        ("/api/v1/dongles/{id}/pairing-mode", "post"),
        ("/api/v1/dongles/{id}/pairing-submit", "post"),
        ("/api/v1/dongles/{id}/unpair", "post"),
        ("/api/v1/admin/dongles/{id}/force-unpair", "post"),
        ("/ws/agent", "get"),
    ] {
        assert!(
            doc.json["paths"][path][expected].is_object(),
            "{expected} {path} undocumented"
        );
    }

    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    // The third caller is an agent, with its bearer token and no cookie.
    let (_, agent_token) = common::agent::register(&admin).await;
    let agent = app.client();
    for (caller, bearer) in [(&anon, None), (&admin, None), (&agent, Some(&agent_token))] {
        for (method, path, statuses) in &ops {
            let mut req = caller
                .http
                .request(method.clone(), caller.url(path))
                .header("X-CSRF-Token", caller.csrf.clone().unwrap_or_default())
                .json(&json!({}));
            if let Some(token) = bearer {
                req = req.bearer_auth(token);
            }
            let res = req.send().await.unwrap();
            let answer = read(res).await;
            let status = answer.status.as_u16();
            assert!(
                statuses.contains(&status),
                "{method} {path} answered {status}, documented {statuses:?}: {}",
                answer.text
            );
            assert_ne!(answer.json["code"], "METHOD_NOT_ALLOWED", "{method} {path}");
            if status >= 400 {
                answer.assert_error(answer.status, answer.json["code"].as_str().unwrap());
            }
        }
    }
}

/// The device report's schema is derived from the type the server reads it into, so it cannot drift
/// from it: every field a real `control_proto::DongleReport` writes, for every transport kind, is a
/// documented property, and nothing else is.
#[test]
fn the_device_report_schema_is_the_agent_protocols_own() {
    use control_proto::{DongleReport, Transport};
    let doc = serde_json::to_value(bridge_server::routes::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let keys = |v: &Value| {
        let mut keys: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        keys
    };
    let transports = [
        Transport::Usb {
            path: "/dev/ttyACM0".into(),
            serial_number: Some("A1".into()),
        },
        Transport::Lan {
            addr: "192.0.2.7:50000".into(),
        },
        Transport::Local {
            endpoint: "slcan".into(),
            identity: "slcan:/dev/ttyACM1".into(),
            location: "/dev/ttyACM1".into(),
            can_set_timing: true,
        },
    ];
    let documented_kinds = schemas["DongleTransport"]["oneOf"]
        .as_array()
        .expect("the transport is one of its kinds");
    assert_eq!(documented_kinds.len(), transports.len());
    for transport in transports {
        let report = serde_json::to_value(DongleReport {
            device_id: "0011223344556677".parse().unwrap(),
            fw_build: "1.0".into(),
            proto_ver: 1,
            capabilities: 0,
            transport,
            pairing_mode: false,
            present: true,
            claimed: false,
        })
        .unwrap();
        assert_eq!(keys(&report), keys(&schemas["DongleReport"]["properties"]));
        let kind = report["transport"]["kind"].as_str().unwrap();
        let documented = documented_kinds
            .iter()
            .find(|k| k["properties"]["kind"]["enum"][0] == kind)
            .unwrap_or_else(|| panic!("transport kind {kind} undocumented"));
        assert_eq!(
            keys(&report["transport"]),
            keys(&documented["properties"]),
            "{kind}"
        );
    }
    // A device id is a `String` under another name: documented inline, never as a reference to a
    // schema nobody defines.
    let device_id = &schemas["DongleReport"]["properties"]["device_id"];
    assert_eq!(device_id["type"], "string", "{device_id}");
    assert_eq!(device_id["pattern"], "^[0-9a-f]{16}$");
    let required: Vec<&str> = schemas["DongleReport"]["required"]
        .as_array()
        .expect("a list of required fields")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(required.contains(&"device_id"), "{required:?}");
    assert!(!required.contains(&"claimed"), "claimed defaults to false");
}
