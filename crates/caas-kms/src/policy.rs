//! Key policies: stored as the JSON document the tenant gave, evaluated for every request
//! on a key. Supported: `Effect` Allow/Deny, `Principal` (`"*"`, `{"AWS": ARN | [ARN]}`; the
//! account root ARN matches every principal of that account), `Action`/`NotAction`
//! (with `*` wildcards), and `Condition` with `StringEquals`, `StringNotEquals`,
//! `StringLike`, `StringNotLike` (and their `IfExists` forms) on
//! `kms:EncryptionContext:<key>`, `kms:CallerAccount` and `aws:PrincipalArn`. An explicit
//! Deny wins; otherwise an Allow is needed (or a grant, see `ops/grants.rs`).
use crate::error::{KmsError, KmsResult};
use serde_json::Value;
use std::collections::BTreeMap;

/// The default key policy AWS creates: the account root may do everything.
pub fn default_policy(account: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{account}:root") },
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
    .to_string()
}

/// Checks a policy document's shape; returns it unchanged when valid.
pub fn validate(doc: &str) -> KmsResult<()> {
    let bad = |m: &str| {
        KmsError::MalformedPolicyDocument(format!("The policy document is malformed: {m}"))
    };
    if doc.len() > 32 * 1024 {
        return Err(bad("larger than 32 KB"));
    }
    let v: Value = serde_json::from_str(doc).map_err(|_| bad("not valid JSON"))?;
    let stmts = statements(&v).ok_or_else(|| bad("no Statement"))?;
    for s in stmts {
        match s.get("Effect").and_then(Value::as_str) {
            Some("Allow") | Some("Deny") => {}
            _ => return Err(bad("Effect must be Allow or Deny")),
        }
        if s.get("Principal").is_none() {
            return Err(bad("Statement lacks Principal"));
        }
        if s.get("Action").is_none() && s.get("NotAction").is_none() {
            return Err(bad("Statement lacks Action"));
        }
        if let Some(c) = s.get("Condition") {
            let ok = c
                .as_object()
                .is_some_and(|m| m.keys().all(|k| known_operator(k)));
            if !ok {
                return Err(bad("unsupported Condition operator"));
            }
        }
    }
    Ok(())
}

fn known_operator(op: &str) -> bool {
    matches!(
        op.trim_end_matches("IfExists"),
        "StringEquals"
            | "StringNotEquals"
            | "StringLike"
            | "StringNotLike"
            | "StringEqualsIgnoreCase"
    )
}

fn statements(v: &Value) -> Option<Vec<&Value>> {
    match v.get("Statement")? {
        Value::Array(a) => Some(a.iter().collect()),
        o @ Value::Object(_) => Some(vec![o]),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    }
}

/// `*`/`?` glob match.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi].eq_ignore_ascii_case(&t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn principal_matches(p: &Value, account: &str, principal: &str) -> bool {
    let list = match p {
        Value::String(s) if s == "*" => return true,
        Value::Object(m) => m.get("AWS").map(strings).unwrap_or_default(),
        _ => vec![],
    };
    // The principal's own account comes from its ARN (`arn:aws:iam::ACCOUNT:...`), falling
    // back to the caller's account.
    let principal_account = principal
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split(':').next())
        .unwrap_or(account);
    list.iter().any(|a| {
        *a == "*"
            || *a == principal
            || a.strip_prefix("arn:aws:iam::")
                .and_then(|r| r.strip_suffix(":root"))
                == Some(principal_account)
            || *a == principal_account
    })
}

fn action_matches(s: &Value, action: &str) -> bool {
    let full = format!("kms:{action}");
    if let Some(a) = s.get("Action") {
        strings(a).iter().any(|p| glob(p, &full))
    } else if let Some(na) = s.get("NotAction") {
        !strings(na).iter().any(|p| glob(p, &full))
    } else {
        false
    }
}

/// What a request presents to conditions.
#[derive(Debug)]
pub struct Request<'a> {
    /// Caller account.
    pub account: &'a str,
    /// Caller principal ARN.
    pub principal: &'a str,
    /// Action name without `kms:`.
    pub action: &'a str,
    /// Encryption context, when the operation has one.
    pub encryption_context: Option<&'a BTreeMap<String, String>>,
}

fn condition_value(req: &Request<'_>, key: &str) -> Option<String> {
    let lk = key.to_ascii_lowercase();
    if let Some(ec_key) = key.strip_prefix("kms:EncryptionContext:") {
        return req
            .encryption_context
            .and_then(|ec| ec.get(ec_key).cloned());
    }
    match lk.as_str() {
        "kms:calleraccount" => Some(req.account.to_string()),
        "aws:principalarn" => Some(req.principal.to_string()),
        _ => None,
    }
}

fn conditions_hold(s: &Value, req: &Request<'_>) -> bool {
    let Some(cond) = s.get("Condition").and_then(Value::as_object) else {
        return true;
    };
    cond.iter().all(|(op, kv)| {
        let if_exists = op.ends_with("IfExists");
        let base = op.trim_end_matches("IfExists");
        let Some(kv) = kv.as_object() else {
            return false;
        };
        kv.iter().all(|(k, expected)| {
            let exp = strings(expected);
            match condition_value(req, k) {
                None => if_exists || base.contains("Not"),
                Some(actual) => match base {
                    "StringEquals" => exp.contains(&actual.as_str()),
                    "StringEqualsIgnoreCase" => exp.iter().any(|e| e.eq_ignore_ascii_case(&actual)),
                    "StringNotEquals" => !exp.contains(&actual.as_str()),
                    "StringLike" => exp.iter().any(|e| glob(e, &actual)),
                    "StringNotLike" => !exp.iter().any(|e| glob(e, &actual)),
                    _ => false,
                },
            }
        })
    })
}

/// The policy's verdict.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// An Allow statement matched and no Deny did.
    Allow,
    /// A Deny statement matched.
    Deny,
    /// Nothing matched.
    NoMatch,
}

/// Evaluates a policy for a request.
pub fn evaluate(doc: &str, req: &Request<'_>) -> Verdict {
    let Ok(v) = serde_json::from_str::<Value>(doc) else {
        return Verdict::NoMatch;
    };
    let Some(stmts) = statements(&v) else {
        return Verdict::NoMatch;
    };
    let mut allowed = false;
    for s in stmts {
        let applies = s
            .get("Principal")
            .is_some_and(|p| principal_matches(p, req.account, req.principal))
            && action_matches(s, req.action)
            && conditions_hold(s, req);
        if applies {
            match s.get("Effect").and_then(Value::as_str) {
                Some("Deny") => return Verdict::Deny,
                Some("Allow") => allowed = true,
                _ => {}
            }
        }
    }
    if allowed {
        Verdict::Allow
    } else {
        Verdict::NoMatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &str, action: &str, ec: &[(&str, &str)], principal: &str, expect: Verdict) {
        let ec: BTreeMap<String, String> = ec
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let req = Request {
            account: "111122223333",
            principal,
            action,
            encryption_context: Some(&ec),
        };
        assert_eq!(evaluate(policy, &req), expect, "{policy} {action}");
    }

    #[test]
    fn default_policy_allows_the_account() {
        let p = default_policy("111122223333");
        check(
            &p,
            "Encrypt",
            &[],
            "arn:aws:iam::111122223333:user/a",
            Verdict::Allow,
        );
        check(
            &p,
            "Encrypt",
            &[],
            "arn:aws:iam::999999999999:user/a",
            Verdict::NoMatch,
        );
    }

    #[test]
    fn deny_and_conditions() {
        let p = r#"{"Statement":[
            {"Effect":"Allow","Principal":{"AWS":"*"},"Action":["kms:Encrypt","kms:Decrypt","kms:Describe*"],
             "Condition":{"StringEquals":{"kms:EncryptionContext:app":"billing"}}},
            {"Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Condition":{"StringLike":{"aws:PrincipalArn":"*:user/intern*"}}}]}"#;
        assert!(validate(p).is_ok());
        let u = "arn:aws:iam::111122223333:user/alice";
        check(p, "Encrypt", &[("app", "billing")], u, Verdict::Allow);
        check(p, "Encrypt", &[("app", "hr")], u, Verdict::NoMatch);
        check(p, "Encrypt", &[], u, Verdict::NoMatch);
        check(
            p,
            "Decrypt",
            &[("app", "billing")],
            "arn:aws:iam::111122223333:user/intern1",
            Verdict::Deny,
        );
        check(p, "Sign", &[("app", "billing")], u, Verdict::NoMatch);
    }

    #[test]
    fn malformed_policies_are_rejected() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"Statement":[{"Effect":"Maybe","Principal":"*","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"NumericLessThan":{}}}]}"#,
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("kms:*", "kms:Encrypt"));
        assert!(glob("kms:Generate*", "kms:GenerateDataKey"));
        assert!(!glob("kms:Generate*", "kms:Encrypt"));
        assert!(glob("a?c", "abc"));
    }
}
