//! Key policies: stored as the JSON document the tenant gave, checked when it is given
//! (`CreateKey`, `PutKeyPolicy`) and evaluated for every request on a key.
//!
//! What the engine evaluates — and everything else is refused at `CreateKey` /
//! `PutKeyPolicy` with `MalformedPolicyDocumentException`, never evaluated fail-open:
//! - `Effect` Allow/Deny; `Principal` `"*"`, `{"AWS": ARN | account | [..]}` (the account
//!   root ARN or account id matches every principal of that account; `Service`/`Federated`
//!   principals are accepted and match no caas caller); `Action`/`NotAction` with `*`/`?`
//!   (case-insensitive, as IAM action names are); `Resource` `"*"` or key ARNs.
//! - Condition operators: `String{Equals,NotEquals,EqualsIgnoreCase,NotEqualsIgnoreCase,
//!   Like,NotLike}` (case-sensitive unless `IgnoreCase`), `Numeric*`, `Date*`, `Bool`,
//!   `Arn{Equals,NotEquals,Like,NotLike}` (per ARN component), `Null`, each with
//!   `...IfExists` (not `Null`), and the `ForAnyValue:` / `ForAllValues:` set qualifiers.
//! - Condition keys ([`SUPPORTED_KEYS`], [`SUPPORTED_PREFIXES`]): `kms:EncryptionContext:<k>`
//!   (the `<k>` part case-insensitive, as in AWS), `kms:EncryptionContextKeys`,
//!   `kms:GrantOperations`, `kms:GranteePrincipal`, `kms:RetiringPrincipal`,
//!   `kms:GrantConstraintType`, `kms:GrantIsForAWSResource` (always false here),
//!   `kms:CallerAccount`, `kms:KeySpec`, `kms:KeyUsage`, `kms:KeyOrigin`,
//!   `kms:CustomerMasterKeySpec`, `kms:CustomerMasterKeyUsage`, `kms:RequestAlias`,
//!   `kms:ResourceAliases`, `kms:ViaService` (never present: no AWS service calls caas),
//!   `aws:PrincipalArn`, `aws:PrincipalAccount`, `aws:ResourceAccount`,
//!   `aws:RequestedRegion`, `aws:CurrentTime`, `aws:EpochTime`, `aws:ResourceTag/<k>`.
//!
//! AWS's rules for absent keys hold: a missing key makes a condition false, except for
//! negated operators (true), `...IfExists` (true) and `ForAllValues:` (true). An explicit
//! Deny wins; otherwise an Allow is needed (or a grant, see `ops/grants.rs`). A stored
//! document the engine cannot read in full (written before these checks, or damaged) is
//! evaluated fail-closed: an unreadable condition makes an Allow not apply and a Deny
//! apply; an unreadable document denies.
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

/// Condition keys the engine evaluates (lower case; matching is case-insensitive).
pub const SUPPORTED_KEYS: &[&str] = &[
    "kms:encryptioncontextkeys",
    "kms:grantoperations",
    "kms:granteeprincipal",
    "kms:retiringprincipal",
    "kms:grantconstrainttype",
    "kms:grantisforawsresource",
    "kms:calleraccount",
    "kms:keyspec",
    "kms:keyusage",
    "kms:keyorigin",
    "kms:customermasterkeyspec",
    "kms:customermasterkeyusage",
    "kms:requestalias",
    "kms:resourcealiases",
    "kms:viaservice",
    "aws:principalarn",
    "aws:principalaccount",
    "aws:resourceaccount",
    "aws:requestedregion",
    "aws:currenttime",
    "aws:epochtime",
];

/// Condition key prefixes the engine evaluates (lower case), followed by a name.
pub const SUPPORTED_PREFIXES: &[&str] = &[
    "kms:encryptioncontext:",
    "aws:resourcetag/",
    // Attestation-gated release (`crate::recipient`): Host, Profile, PCR<n>.
    crate::recipient::CONDITION_PREFIX,
];

/// Multi-valued condition keys.
const MULTI_VALUED: &[&str] = &[
    "kms:encryptioncontextkeys",
    "kms:grantoperations",
    "kms:resourcealiases",
];

/// What a condition key holds, for checking operators against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    String,
    Arn,
    Bool,
    Date,
    Numeric,
}

fn key_type(key: &str) -> KeyType {
    match key {
        "aws:principalarn" | "kms:granteeprincipal" | "kms:retiringprincipal" => KeyType::Arn,
        "kms:grantisforawsresource" => KeyType::Bool,
        "aws:currenttime" => KeyType::Date,
        "aws:epochtime" => KeyType::Numeric,
        _ => KeyType::String,
    }
}

fn supported_key(key: &str) -> bool {
    SUPPORTED_KEYS.contains(&key)
        || SUPPORTED_PREFIXES
            .iter()
            .any(|p| key.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    NumericEquals,
    NumericNotEquals,
    NumericLessThan,
    NumericLessThanEquals,
    NumericGreaterThan,
    NumericGreaterThanEquals,
    DateEquals,
    DateNotEquals,
    DateLessThan,
    DateLessThanEquals,
    DateGreaterThan,
    DateGreaterThanEquals,
    Bool,
    ArnEquals,
    ArnNotEquals,
    ArnLike,
    ArnNotLike,
    Null,
}

impl Base {
    fn parse(s: &str) -> Option<Base> {
        use Base::*;
        Some(match s {
            "StringEquals" => StringEquals,
            "StringNotEquals" => StringNotEquals,
            "StringEqualsIgnoreCase" => StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => StringNotEqualsIgnoreCase,
            "StringLike" => StringLike,
            "StringNotLike" => StringNotLike,
            "NumericEquals" => NumericEquals,
            "NumericNotEquals" => NumericNotEquals,
            "NumericLessThan" => NumericLessThan,
            "NumericLessThanEquals" => NumericLessThanEquals,
            "NumericGreaterThan" => NumericGreaterThan,
            "NumericGreaterThanEquals" => NumericGreaterThanEquals,
            "DateEquals" => DateEquals,
            "DateNotEquals" => DateNotEquals,
            "DateLessThan" => DateLessThan,
            "DateLessThanEquals" => DateLessThanEquals,
            "DateGreaterThan" => DateGreaterThan,
            "DateGreaterThanEquals" => DateGreaterThanEquals,
            "Bool" => Bool,
            "ArnEquals" => ArnEquals,
            "ArnNotEquals" => ArnNotEquals,
            "ArnLike" => ArnLike,
            "ArnNotLike" => ArnNotLike,
            "Null" => Null,
            _ => return None,
        })
    }

    /// Negated operators are true for an absent key.
    fn negated(self) -> bool {
        use Base::*;
        matches!(
            self,
            StringNotEquals
                | StringNotEqualsIgnoreCase
                | StringNotLike
                | NumericNotEquals
                | DateNotEquals
                | ArnNotEquals
                | ArnNotLike
        )
    }

    fn family(self) -> Family {
        use Base::*;
        match self {
            StringEquals
            | StringNotEquals
            | StringEqualsIgnoreCase
            | StringNotEqualsIgnoreCase
            | StringLike
            | StringNotLike => Family::String,
            NumericEquals
            | NumericNotEquals
            | NumericLessThan
            | NumericLessThanEquals
            | NumericGreaterThan
            | NumericGreaterThanEquals => Family::Numeric,
            DateEquals
            | DateNotEquals
            | DateLessThan
            | DateLessThanEquals
            | DateGreaterThan
            | DateGreaterThanEquals => Family::Date,
            Bool => Family::Bool,
            ArnEquals | ArnNotEquals | ArnLike | ArnNotLike => Family::Arn,
            Null => Family::Null,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    String,
    Numeric,
    Date,
    Bool,
    Arn,
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOp {
    ForAnyValue,
    ForAllValues,
}

#[derive(Debug, Clone, Copy)]
struct Operator {
    set: Option<SetOp>,
    base: Base,
    if_exists: bool,
}

impl Operator {
    fn parse(s: &str) -> Result<Operator, String> {
        let (set, rest) = if let Some(r) = s.strip_prefix("ForAnyValue:") {
            (Some(SetOp::ForAnyValue), r)
        } else if let Some(r) = s.strip_prefix("ForAllValues:") {
            (Some(SetOp::ForAllValues), r)
        } else {
            (None, s)
        };
        let (rest, if_exists) = match rest.strip_suffix("IfExists") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let base = Base::parse(rest)
            .ok_or_else(|| format!("unsupported condition operator '{}'", clip(s)))?;
        if base == Base::Null && (if_exists || set.is_some()) {
            return Err(format!("condition operator '{}' is not valid", clip(s)));
        }
        Ok(Operator {
            set,
            base,
            if_exists,
        })
    }
}

/// One condition: operator, key (lower case), the policy's values.
#[derive(Debug, Clone)]
struct Condition {
    op: Operator,
    key: String,
    values: Vec<String>,
}

/// A statement's condition block: readable, or not (then evaluated fail-closed).
#[derive(Debug, Clone)]
enum Conditions {
    Readable(Vec<Condition>),
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
enum Principals {
    Any,
    /// AWS principals (ARNs or account ids). Service/Federated principals add nothing.
    Aws(Vec<String>),
}

#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    principals: Principals,
    actions: Vec<String>,
    not_action: bool,
    resources: Vec<String>,
    conditions: Conditions,
}

fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}

fn bad(m: &str) -> KmsError {
    KmsError::MalformedPolicyDocument(format!("The policy document is malformed: {m}"))
}

/// A JSON value (string, number, bool or a list of them) as strings.
fn scalar_list(v: &Value) -> Option<Vec<String>> {
    let one = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        other => one(other).map(|s| vec![s]),
    }
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

fn parse_conditions(c: &Value) -> Result<Vec<Condition>, String> {
    let m = c
        .as_object()
        .ok_or_else(|| "Condition must be an object".to_string())?;
    let mut out = vec![];
    for (op_name, kv) in m {
        let op = Operator::parse(op_name)?;
        let kv = kv
            .as_object()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| format!("condition '{}' must map keys to values", clip(op_name)))?;
        for (key, vals) in kv {
            let key = key.to_ascii_lowercase();
            if !supported_key(&key) {
                return Err(format!("unsupported condition key '{}'", clip(&key)));
            }
            let values = scalar_list(vals)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("condition key '{}' needs values", clip(&key)))?;
            check_operator_fits(&op, &key, &values)?;
            out.push(Condition { op, key, values });
        }
    }
    Ok(out)
}

/// Refuses operator/key/value combinations the engine could only guess at.
fn check_operator_fits(op: &Operator, key: &str, values: &[String]) -> Result<(), String> {
    let kt = key_type(key);
    let fam = op.base.family();
    let ok = match fam {
        Family::String => true,
        Family::Null => values.iter().all(|v| parse_bool(v).is_some()),
        Family::Bool => kt == KeyType::Bool && values.iter().all(|v| parse_bool(v).is_some()),
        Family::Arn => kt == KeyType::Arn,
        Family::Numeric => {
            kt == KeyType::Numeric && values.iter().all(|v| v.parse::<f64>().is_ok())
        }
        Family::Date => {
            matches!(kt, KeyType::Date | KeyType::Numeric)
                && values.iter().all(|v| parse_date_ms(v).is_some())
        }
    };
    if !ok {
        return Err(format!(
            "condition operator {:?} cannot be used with key '{}' and these values",
            op.base,
            clip(key)
        ));
    }
    if op.set.is_some() && fam == Family::Null {
        return Err("Null cannot take a set qualifier".into());
    }
    Ok(())
}

fn parse_statement(s: &Value, strict: bool) -> Result<Statement, String> {
    let effect = match s.get("Effect").and_then(Value::as_str) {
        Some("Allow") => Effect::Allow,
        Some("Deny") => Effect::Deny,
        _ => return Err("Effect must be Allow or Deny".into()),
    };
    if s.get("NotPrincipal").is_some() {
        return Err("NotPrincipal is not supported".into());
    }
    if s.get("NotResource").is_some() {
        return Err("NotResource is not supported".into());
    }
    let principals = match s.get("Principal") {
        Some(Value::String(p)) if p == "*" => Principals::Any,
        Some(Value::Object(m)) if !m.is_empty() => {
            let mut aws = vec![];
            for (kind, v) in m {
                let list =
                    string_list(v).ok_or_else(|| "Principal values must be strings".to_string())?;
                match kind.as_str() {
                    "AWS" => aws.extend(list),
                    "Service" | "Federated" | "CanonicalUser" => {}
                    _ => return Err(format!("unsupported Principal type '{}'", clip(kind))),
                }
            }
            if aws.iter().any(|a| a == "*") {
                Principals::Any
            } else {
                Principals::Aws(aws)
            }
        }
        Some(_) => return Err("Principal must be \"*\" or an object".into()),
        None => return Err("Statement lacks Principal".into()),
    };
    let (actions, not_action) = match (s.get("Action"), s.get("NotAction")) {
        (Some(a), None) => (
            string_list(a).ok_or_else(|| "Action must be strings".to_string())?,
            false,
        ),
        (None, Some(a)) => (
            string_list(a).ok_or_else(|| "NotAction must be strings".to_string())?,
            true,
        ),
        (Some(_), Some(_)) => return Err("Statement has both Action and NotAction".into()),
        (None, None) => return Err("Statement lacks Action".into()),
    };
    let resources = match s.get("Resource") {
        Some(r) => string_list(r).ok_or_else(|| "Resource must be strings".to_string())?,
        None => vec!["*".into()],
    };
    let conditions = match s.get("Condition") {
        None => Conditions::Readable(vec![]),
        Some(c) => match parse_conditions(c) {
            Ok(c) => Conditions::Readable(c),
            Err(e) if strict => return Err(e),
            Err(_) => Conditions::Unreadable,
        },
    };
    Ok(Statement {
        effect,
        principals,
        actions,
        not_action,
        resources,
        conditions,
    })
}

fn statements(v: &Value) -> Option<Vec<&Value>> {
    match v.get("Statement")? {
        Value::Array(a) if !a.is_empty() => Some(a.iter().collect()),
        o @ Value::Object(_) => Some(vec![o]),
        _ => None,
    }
}

/// Checks a policy document: everything in it must be something the engine evaluates.
pub fn validate(doc: &str) -> KmsResult<()> {
    if doc.len() > 32 * 1024 {
        return Err(bad("larger than 32 KB"));
    }
    let v: Value = serde_json::from_str(doc).map_err(|_| bad("not valid JSON"))?;
    let stmts = statements(&v).ok_or_else(|| bad("no Statement"))?;
    for s in stmts {
        if !s.is_object() {
            return Err(bad("a Statement must be an object"));
        }
        parse_statement(s, true).map_err(|e| bad(&e))?;
    }
    Ok(())
}

/// `*`/`?` glob match; `ignore_case` for action names only.
pub fn glob(pattern: &str, s: &str, ignore_case: bool) -> bool {
    // The common shapes without allocating: "*", a literal, "prefix*".
    if pattern == "*" {
        return true;
    }
    let eq_str = |a: &str, b: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(b) || a.to_lowercase() == b.to_lowercase()
        } else {
            a == b
        }
    };
    match pattern.find(['*', '?']) {
        None => return eq_str(pattern, s),
        Some(i) if i + 1 == pattern.len() && pattern.ends_with('*') => {
            return s.get(..i).is_some_and(|head| eq_str(&pattern[..i], head));
        }
        _ => {}
    }
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let eq = |a: char, b: char| {
        if ignore_case {
            a.to_lowercase().eq(b.to_lowercase())
        } else {
            a == b
        }
    };
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && (p[pi] == '?' || eq(p[pi], t[ti])) {
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

/// `ArnLike`: the six colon-separated components are matched one by one.
fn arn_like(pattern: &str, arn: &str) -> bool {
    let p: Vec<&str> = pattern.splitn(6, ':').collect();
    let a: Vec<&str> = arn.splitn(6, ':').collect();
    p.len() == 6 && a.len() == 6 && p.iter().zip(&a).all(|(p, a)| glob(p, a, false))
}

fn parse_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// ISO 8601 (`2026-12-05`, `2026-12-05T12:00:00Z`, `...T12:00:00.123+01:00`) or epoch
/// seconds, as Unix milliseconds.
pub fn parse_date_ms(s: &str) -> Option<i64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1000);
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = crate::sigv4::parse_amz_date(&format!("{y:04}{mo:02}{d:02}T000000Z"))? / 86400;
    let mut ms = days * 86_400_000;
    if b.len() == 10 {
        return Some(ms);
    }
    if b[10] != b'T' || b.len() < 16 || b[13] != b':' {
        return None;
    }
    let (h, mi) = (num(11..13)?, num(14..16)?);
    let mut i = 16;
    let mut sec = 0;
    if b.get(16) == Some(&b':') {
        sec = num(17..19)?;
        i = 19;
        if b.get(19) == Some(&b'.') {
            i = 20;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    ms += (h * 3600 + mi * 60 + sec) * 1000;
    match &s[i..] {
        "Z" | "" => Some(ms),
        tz => {
            let sign = match tz.as_bytes().first() {
                Some(b'+') => -1,
                Some(b'-') => 1,
                _ => return None,
            };
            let t = tz.get(1..)?.replace(':', "");
            if t.len() != 4 || !t.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let (th, tm) = (t[..2].parse::<i64>().ok()?, t[2..].parse::<i64>().ok()?);
            Some(ms + sign * (th * 3600 + tm * 60) * 1000)
        }
    }
}

/// Three-valued truth: `Unknown` when a request value cannot be read as the operator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn of(b: bool) -> Truth {
        if b { Truth::True } else { Truth::False }
    }
    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        }
    }
    fn any(it: impl Iterator<Item = Truth>) -> Truth {
        let mut unknown = false;
        for t in it {
            match t {
                Truth::True => return Truth::True,
                Truth::Unknown => unknown = true,
                Truth::False => {}
            }
        }
        if unknown {
            Truth::Unknown
        } else {
            Truth::False
        }
    }
    fn all(it: impl Iterator<Item = Truth>) -> Truth {
        Truth::any(it.map(Truth::not)).not()
    }
}

/// The request's side of the evaluation: who, what, and the condition keys present.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Caller account.
    pub account: String,
    /// Caller principal ARN.
    pub principal: String,
    /// Action name without `kms:`.
    pub action: String,
    /// The key's ARN (for `Resource`).
    pub resource: String,
    values: BTreeMap<String, Vec<String>>,
}

impl Context {
    /// A context for `principal` of `account` doing `action` on `resource`, with
    /// `kms:CallerAccount`, `aws:PrincipalArn` and `aws:PrincipalAccount` set.
    pub fn new(account: &str, principal: &str, action: &str, resource: &str) -> Context {
        let mut c = Context {
            account: account.into(),
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            values: BTreeMap::new(),
        };
        c.set("kms:CallerAccount", account);
        c.set("aws:PrincipalArn", principal);
        c.set(
            "aws:PrincipalAccount",
            principal_account(principal, account),
        );
        c
    }

    /// Sets a single-valued key (name case-insensitive).
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.values
            .insert(key.to_ascii_lowercase(), vec![value.to_string()]);
        self
    }

    /// Sets a multi-valued key.
    pub fn set_all<S: AsRef<str>>(&mut self, key: &str, values: &[S]) -> &mut Self {
        self.values.insert(
            key.to_ascii_lowercase(),
            values.iter().map(|v| v.as_ref().to_string()).collect(),
        );
        self
    }

    /// Sets `kms:EncryptionContext:<k>` for every pair and `kms:EncryptionContextKeys`
    /// (both absent for an empty context). Keys differing only by case give one condition
    /// key several values, which single-valued operators treat as unknown (fail-closed).
    pub fn encryption_context(&mut self, ec: &BTreeMap<String, String>) -> &mut Self {
        if ec.is_empty() {
            return self;
        }
        for (k, v) in ec {
            self.values
                .entry(format!("kms:encryptioncontext:{}", k.to_ascii_lowercase()))
                .or_default()
                .push(v.clone());
        }
        let keys: Vec<&String> = ec.keys().collect();
        self.set_all("kms:EncryptionContextKeys", &keys)
    }

    /// Sets the time keys (`aws:CurrentTime`, `aws:EpochTime`).
    pub fn time(&mut self, now_ms: i64) -> &mut Self {
        self.set("aws:CurrentTime", &crate::audit::iso8601(now_ms));
        self.set("aws:EpochTime", &now_ms.div_euclid(1000).to_string())
    }

    fn get(&self, key: &str) -> Option<&[String]> {
        self.values.get(key).map(Vec::as_slice)
    }
}

/// The account of a principal ARN (`arn:aws:iam::ACCOUNT:...`), else `fallback`.
fn principal_account<'a>(principal: &'a str, fallback: &'a str) -> &'a str {
    principal
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split(':').next())
        .unwrap_or(fallback)
}

/// One request value against the policy's values.
fn single(base: Base, v: &str, policy: &[String]) -> Truth {
    use Base::*;
    let num = |s: &str| s.parse::<f64>().ok();
    let cmp_num = |f: &dyn Fn(f64, f64) -> bool| -> Truth {
        match num(v) {
            None => Truth::Unknown,
            Some(x) => Truth::any(policy.iter().map(|p| match num(p) {
                Some(y) => Truth::of(f(x, y)),
                None => Truth::Unknown,
            })),
        }
    };
    let cmp_date = |f: &dyn Fn(i64, i64) -> bool| -> Truth {
        match parse_date_ms(v) {
            None => Truth::Unknown,
            Some(x) => Truth::any(policy.iter().map(|p| match parse_date_ms(p) {
                Some(y) => Truth::of(f(x, y)),
                None => Truth::Unknown,
            })),
        }
    };
    match base {
        StringEquals => Truth::of(policy.iter().any(|p| p == v)),
        StringNotEquals => Truth::of(!policy.iter().any(|p| p == v)),
        StringEqualsIgnoreCase => {
            Truth::of(policy.iter().any(|p| p.to_lowercase() == v.to_lowercase()))
        }
        StringNotEqualsIgnoreCase => {
            Truth::of(!policy.iter().any(|p| p.to_lowercase() == v.to_lowercase()))
        }
        StringLike => Truth::of(policy.iter().any(|p| glob(p, v, false))),
        StringNotLike => Truth::of(!policy.iter().any(|p| glob(p, v, false))),
        NumericEquals => cmp_num(&|x, y| x == y),
        NumericNotEquals => cmp_num(&|x, y| x == y).not(),
        NumericLessThan => cmp_num(&|x, y| x < y),
        NumericLessThanEquals => cmp_num(&|x, y| x <= y),
        NumericGreaterThan => cmp_num(&|x, y| x > y),
        NumericGreaterThanEquals => cmp_num(&|x, y| x >= y),
        DateEquals => cmp_date(&|x, y| x == y),
        DateNotEquals => cmp_date(&|x, y| x == y).not(),
        DateLessThan => cmp_date(&|x, y| x < y),
        DateLessThanEquals => cmp_date(&|x, y| x <= y),
        DateGreaterThan => cmp_date(&|x, y| x > y),
        DateGreaterThanEquals => cmp_date(&|x, y| x >= y),
        Bool => match parse_bool(v) {
            None => Truth::Unknown,
            Some(x) => Truth::of(policy.iter().any(|p| parse_bool(p) == Some(x))),
        },
        ArnEquals | ArnLike => Truth::of(policy.iter().any(|p| arn_like(p, v))),
        ArnNotEquals | ArnNotLike => Truth::of(!policy.iter().any(|p| arn_like(p, v))),
        // Handled by the caller.
        Null => Truth::Unknown,
    }
}

fn condition_holds(c: &Condition, ctx: &Context) -> Truth {
    let present = ctx.get(&c.key).filter(|v| !v.is_empty());
    if c.op.base == Base::Null {
        // "Null": true ⇔ the key is absent.
        let want_absent = c.values.iter().any(|v| parse_bool(v) == Some(true));
        let want_present = c.values.iter().any(|v| parse_bool(v) == Some(false));
        return Truth::of(
            (present.is_none() && want_absent) || (present.is_some() && want_present),
        );
    }
    let Some(vals) = present else {
        return Truth::of(match c.op.set {
            Some(SetOp::ForAllValues) => true,
            Some(SetOp::ForAnyValue) => c.op.if_exists,
            None => c.op.if_exists || c.op.base.negated(),
        });
    };
    let each = vals.iter().map(|v| single(c.op.base, v, &c.values));
    match c.op.set {
        Some(SetOp::ForAnyValue) => Truth::any(each),
        Some(SetOp::ForAllValues) => Truth::all(each),
        None if vals.len() == 1 => single(c.op.base, &vals[0], &c.values),
        None if MULTI_VALUED.contains(&c.key.as_str()) => {
            // A single-valued operator on a multi-valued key: a positive operator matches
            // if any value does, a negated one if every value does (no value is excluded).
            if c.op.base.negated() {
                Truth::all(each)
            } else {
                Truth::any(each)
            }
        }
        // A single-valued key with several values (encryption context keys differing
        // only by case): ambiguous.
        None => Truth::Unknown,
    }
}

fn principal_matches(p: &Principals, ctx: &Context) -> bool {
    match p {
        Principals::Any => true,
        Principals::Aws(list) => {
            let acct = principal_account(&ctx.principal, &ctx.account);
            list.iter().any(|a| {
                *a == ctx.principal
                    || a.strip_prefix("arn:aws:iam::")
                        .and_then(|r| r.strip_suffix(":root"))
                        == Some(acct)
                    || *a == acct
            })
        }
    }
}

fn action_matches(s: &Statement, action: &str) -> bool {
    let full = format!("kms:{action}");
    let any = s.actions.iter().any(|p| glob(p, &full, true));
    any != s.not_action
}

/// The policy's verdict.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// An Allow statement matched and no Deny did.
    Allow,
    /// A Deny statement matched (or the document could not be read).
    Deny,
    /// Nothing matched.
    NoMatch,
}

/// A stored policy document parsed once: what every request on the key is evaluated
/// against. Parsing is the costly part (JSON, then every statement and condition), so the
/// service keeps parsed documents in a [`PolicyCache`].
#[derive(Debug)]
pub struct Policy {
    /// The statements, or `None` when the document (or any statement in it) cannot be
    /// read: such a document denies every request (fail-closed).
    statements: Option<Vec<Statement>>,
}

impl Policy {
    /// Parses a stored document. Never fails: an unreadable document becomes one that
    /// denies everything, and an unreadable condition block one that makes its Allow not
    /// apply and its Deny apply.
    pub fn parse(doc: &str) -> Policy {
        let statements = serde_json::from_str::<Value>(doc).ok().and_then(|v| {
            statements(&v)?
                .into_iter()
                .map(|raw| parse_statement(raw, false).ok())
                .collect::<Option<Vec<_>>>()
        });
        Policy { statements }
    }

    /// Could a condition of this document read any condition key? (If not, the request's
    /// condition keys need not be built.) An unreadable document or condition block says yes.
    pub fn has_conditions(&self) -> bool {
        match &self.statements {
            None => true,
            Some(ss) => ss.iter().any(|s| match &s.conditions {
                Conditions::Unreadable => true,
                Conditions::Readable(cs) => !cs.is_empty(),
            }),
        }
    }

    /// Could a condition read `key` (ASCII case-insensitively), so that a costly value is
    /// worth computing? Decided on the parsed keys (JSON escapes already undone); an
    /// unreadable document or condition block says yes, as a wrong "no" would leave a
    /// Deny's condition key unset (fail-open).
    pub fn mentions(&self, key: &str) -> bool {
        match &self.statements {
            None => true,
            Some(ss) => ss.iter().any(|s| match &s.conditions {
                Conditions::Unreadable => true,
                Conditions::Readable(cs) => cs.iter().any(|c| c.key.eq_ignore_ascii_case(key)),
            }),
        }
    }

    /// The verdict for a request.
    /// [`Policy::evaluate`] for `principal` of `account` doing `action` on `resource`
    /// with no further condition key: the request context is built with
    /// [`Context::new`]'s keys only when a condition could read one (see
    /// [`Policy::has_conditions`]); otherwise the base keys are not materialised, which
    /// changes nothing, since no condition reads them. Callers with more condition keys to
    /// set build their [`Context`] themselves.
    pub fn evaluate_unconditioned(
        &self,
        account: &str,
        principal: &str,
        action: &str,
        resource: &str,
    ) -> Verdict {
        if self.has_conditions() {
            return self.evaluate(&Context::new(account, principal, action, resource));
        }
        self.evaluate(&Context {
            account: account.into(),
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            values: BTreeMap::new(),
        })
    }

    /// The verdict of this document for the request `ctx`.
    pub fn evaluate(&self, ctx: &Context) -> Verdict {
        let Some(stmts) = &self.statements else {
            return Verdict::Deny;
        };
        let mut allowed = false;
        for s in stmts {
            if !principal_matches(&s.principals, ctx)
                || !action_matches(s, &ctx.action)
                || !s.resources.iter().any(|r| glob(r, &ctx.resource, false))
            {
                continue;
            }
            let truth = match &s.conditions {
                Conditions::Unreadable => Truth::Unknown,
                Conditions::Readable(cs) => Truth::all(cs.iter().map(|c| condition_holds(c, ctx))),
            };
            match (s.effect, truth) {
                (Effect::Deny, Truth::True | Truth::Unknown) => return Verdict::Deny,
                (Effect::Allow, Truth::True) => allowed = true,
                _ => {}
            }
        }
        if allowed {
            Verdict::Allow
        } else {
            Verdict::NoMatch
        }
    }
}

/// Evaluates a stored policy document for a request (parsing it; see [`PolicyCache`]).
pub fn evaluate(doc: &str, ctx: &Context) -> Verdict {
    Policy::parse(doc).evaluate(ctx)
}

/// Parsed policies by document text. The text is the cache key, so a hit is exactly the
/// document the key record holds (which the store has authenticated); a changed policy is
/// a new text and a new entry. Bounded: past [`PolicyCache::CAPACITY`] distinct documents
/// it starts over (most accounts share the default policy's few variants).
#[derive(Debug, Default)]
pub struct PolicyCache {
    map: std::sync::RwLock<std::collections::HashMap<Box<str>, std::sync::Arc<Policy>>>,
}

impl PolicyCache {
    /// Distinct documents kept before the cache is emptied.
    pub const CAPACITY: usize = 4096;

    /// The parsed form of `doc`.
    pub fn get(&self, doc: &str) -> std::sync::Arc<Policy> {
        if let Some(p) = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(doc)
        {
            return p.clone();
        }
        let parsed = std::sync::Arc::new(Policy::parse(doc));
        let mut map = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= Self::CAPACITY {
            map.clear();
        }
        map.insert(doc.into(), parsed.clone());
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Allow, Deny, NoMatch};

    const ACCOUNT: &str = "111122223333";
    const ALICE: &str = "arn:aws:iam::111122223333:user/alice";
    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";

    /// A request: action, principal, encryption context, then extra `key=value` pairs
    /// (`key=a|b` for multi-valued keys).
    struct Rq<'a> {
        action: &'a str,
        principal: &'a str,
        ec: &'a [(&'a str, &'a str)],
        keys: &'a [(&'a str, &'a str)],
    }

    fn rq<'a>(action: &'a str) -> Rq<'a> {
        Rq {
            action,
            principal: ALICE,
            ec: &[],
            keys: &[],
        }
    }

    fn ctx_of(r: &Rq<'_>) -> Context {
        let mut c = Context::new(ACCOUNT, r.principal, r.action, KEY);
        let ec: BTreeMap<String, String> =
            r.ec.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        c.encryption_context(&ec);
        c.time(1_764_936_000_000); // 2025-12-05T12:00:00Z
        for (k, v) in r.keys {
            let vals: Vec<&str> = v.split('|').collect();
            c.set_all(k, &vals);
        }
        c
    }

    /// The fast path that skips building condition keys must never skip a condition: a
    /// Deny conditioned on the caller's own account (one of the base keys it would leave
    /// out) still denies, and the same document without conditions gives the same verdict
    /// as the full context.
    #[test]
    fn unconditioned_fast_path_still_applies_a_deny_conditioned_on_a_base_key() {
        let deny_own_account = format!(
            r#"{{"Version":"2012-10-17","Statement":[
            {{"Effect":"Allow","Principal":{{"AWS":"*"}},"Action":"kms:*","Resource":"*"}},
            {{"Effect":"Deny","Principal":{{"AWS":"*"}},"Action":"kms:Decrypt","Resource":"*",
              "Condition":{{"StringEquals":{{"kms:CallerAccount":"{ACCOUNT}"}}}}}}]}}"#
        );
        let p = Policy::parse(&deny_own_account);
        assert!(p.has_conditions());
        assert_eq!(
            p.evaluate_unconditioned(ACCOUNT, ALICE, "Decrypt", KEY),
            Deny
        );
        assert_eq!(
            p.evaluate_unconditioned(ACCOUNT, ALICE, "Encrypt", KEY),
            Allow
        );
        let plain = r#"{"Version":"2012-10-17","Statement":[
            {"Effect":"Allow","Principal":{"AWS":"*"},"Action":"kms:Encrypt","Resource":"*"}]}"#;
        let p = Policy::parse(plain);
        assert!(!p.has_conditions());
        for action in ["Encrypt", "Decrypt"] {
            assert_eq!(
                p.evaluate_unconditioned(ACCOUNT, ALICE, action, KEY),
                p.evaluate(&Context::new(ACCOUNT, ALICE, action, KEY))
            );
        }
        assert_eq!(
            p.evaluate_unconditioned(ACCOUNT, ALICE, "Decrypt", KEY),
            NoMatch
        );
    }

    /// The policy must validate, and give `expect` for the request.
    fn check(policy: &str, r: Rq<'_>, expect: Verdict) {
        assert!(
            validate(policy).is_ok(),
            "{policy}: {:?}",
            validate(policy).err()
        );
        assert_eq!(
            evaluate(policy, &ctx_of(&r)),
            expect,
            "{policy} {} {:?} {:?}",
            r.action,
            r.ec,
            r.keys
        );
    }

    /// One statement with `effect`, all principals, kms:* and this condition.
    fn stmt(effect: &str, cond: &str) -> String {
        format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"{effect}","Principal":"*","Action":"kms:*","Resource":"*","Condition":{cond}}}]}}"#
        )
    }

    /// Allow everything to the account, plus a Deny statement with `cond`.
    fn deny_with(cond: &str) -> String {
        format!(
            r#"{{"Statement":[{{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::{ACCOUNT}:root"}},"Action":"kms:*","Resource":"*"}},
            {{"Effect":"Deny","Principal":"*","Action":"kms:*","Resource":"*","Condition":{cond}}}]}}"#
        )
    }

    #[test]
    fn default_policy_allows_the_account_only() {
        let p = default_policy(ACCOUNT);
        check(&p, rq("Encrypt"), Allow);
        check(
            &p,
            Rq {
                principal: "arn:aws:iam::999999999999:user/a",
                ..rq("Encrypt")
            },
            NoMatch,
        );
    }

    #[test]
    fn string_like_is_case_sensitive() {
        // Old engine: StringLike matched case-insensitively, so "BILLING*" allowed "billing".
        let p = stmt(
            "Allow",
            r#"{"StringLike":{"kms:EncryptionContext:app":"billing*"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "billing-eu")],
                ..rq("Encrypt")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "BILLING-eu")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        let p = stmt(
            "Allow",
            r#"{"StringEquals":{"kms:EncryptionContext:app":"billing"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "Billing")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        let p = stmt(
            "Allow",
            r#"{"StringEqualsIgnoreCase":{"kms:EncryptionContext:app":"billing"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "Billing")],
                ..rq("Encrypt")
            },
            Allow,
        );
        let p = stmt(
            "Allow",
            r#"{"StringNotEqualsIgnoreCase":{"kms:EncryptionContext:app":"billing"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "Billing")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "hr")],
                ..rq("Encrypt")
            },
            Allow,
        );
        // The condition key's context-key part is case-insensitive (AWS), the value is not.
        let p = stmt(
            "Allow",
            r#"{"StringEquals":{"kms:encryptioncontext:APP":"billing"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "billing")],
                ..rq("Encrypt")
            },
            Allow,
        );
        // Two context keys differing only by case: ambiguous, an Allow does not apply...
        let p = stmt(
            "Allow",
            r#"{"StringEquals":{"kms:EncryptionContext:app":"billing"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("app", "billing"), ("APP", "x")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        // ...and a Deny does.
        let p = deny_with(r#"{"StringEquals":{"kms:EncryptionContext:app":"secret"}}"#);
        check(
            &p,
            Rq {
                ec: &[("app", "public"), ("App", "secret")],
                ..rq("Encrypt")
            },
            Deny,
        );
    }

    #[test]
    fn deny_with_unsupported_condition_is_refused_at_validate() {
        // Old engine: accepted, and evaluated the Deny as not applying (fail-open).
        for cond in [
            r#"{"StringEquals":{"aws:SourceVpc":"vpc-1"}}"#,
            r#"{"Bool":{"aws:SecureTransport":"false"}}"#,
            r#"{"StringEquals":{"kms:EncryptionAlgorithm":"RSAES_OAEP_SHA_1"}}"#,
            r#"{"IpAddress":{"aws:SourceIp":"10.0.0.0/8"}}"#,
            r#"{"StringEquals":{"kms:EncryptionContext:":"x"}}"#,
            r#"{"NumericLessThan":{"kms:KeySpec":"3"}}"#,
            r#"{"Bool":{"kms:CallerAccount":"true"}}"#,
            r#"{"NullIfExists":{"kms:RequestAlias":"true"}}"#,
            r#"{"ForAnyValue:Null":{"kms:RequestAlias":"true"}}"#,
            r#"{"DateLessThan":{"aws:CurrentTime":"not a date"}}"#,
            r#"{"ArnLike":{"kms:CallerAccount":"arn:*"}}"#,
            r#"{"StringEquals":{"kms:CallerAccount":[]}}"#,
            r#"{"StringEquals":"kms:CallerAccount"}"#,
            r#"{"StringEqualz":{"kms:CallerAccount":"1"}}"#,
        ] {
            let p = deny_with(cond);
            assert!(
                matches!(validate(&p), Err(KmsError::MalformedPolicyDocument(_))),
                "{cond}"
            );
            // Were such a document stored anyway (older engine, restored row), the Deny
            // applies: an unreadable condition never makes a Deny not apply...
            assert_eq!(evaluate(&p, &ctx_of(&rq("Decrypt"))), Deny, "{cond}");
            // ...nor an Allow apply.
            let a = stmt("Allow", cond);
            assert_eq!(evaluate(&a, &ctx_of(&rq("Decrypt"))), NoMatch, "{cond}");
        }
        assert_eq!(evaluate("{not json", &ctx_of(&rq("Decrypt"))), Deny);
    }

    #[test]
    fn malformed_policies_are_rejected() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"Statement":[]}"#,
            r#"{"Statement":[{"Effect":"Maybe","Principal":"*","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","NotAction":"kms:Decrypt"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","NotPrincipal":{"AWS":"x"},"Principal":"*","Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","NotResource":"x"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"Alien":"x"},"Action":"kms:*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"NumericLessThan":{}}}]}"#,
            r#"{"Statement":[1]}"#,
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    /// A key administrator's policy whose Deny is spelled with JSON escapes
    /// (`"Cond\u0069tion"`, `kms:Resource\u0041liases`) is the same policy once parsed: the
    /// text shortcuts that skip building condition keys must not read it as having none.
    #[test]
    fn escaped_condition_keys_are_not_skipped() {
        let doc = r#"{"Statement":[{"Effect":"Deny","Principal":{"AWS":"*"},"Action":"kms:*","Resource":"*","Cond\u0069tion":{"StringEquals":{"kms:Resource\u0041liases":"alias/x"}}}]}"#;
        assert!(
            validate(doc).is_ok(),
            "the escaped policy is a valid policy"
        );
        let parsed = Policy::parse(doc);
        assert!(parsed.has_conditions());
        assert!(parsed.mentions("kms:ResourceAliases"));
        assert!(
            parsed.mentions("KMS:RESOURCEALIASES"),
            "condition keys are case-insensitive"
        );
        assert!(!parsed.mentions("kms:RequestAlias"));
        let plain = Policy::parse(&default_policy(ACCOUNT));
        assert!(!plain.has_conditions());
        assert!(!plain.mentions("kms:ResourceAliases"));
        // What cannot be read is assumed to read every key.
        for unreadable in [
            r#"{"Statement":[]}"#,
            "{not json",
            r#"{"Statement":[{"Condition":{}}]}"#,
        ] {
            let p = Policy::parse(unreadable);
            assert!(
                p.has_conditions() && p.mentions("kms:ResourceAliases"),
                "{unreadable}"
            );
        }
    }

    #[test]
    fn absent_keys_follow_aws() {
        let ec = &[("app", "billing")][..];
        // Positive operator, key absent: false; negated: true; IfExists: true.
        let p = stmt(
            "Allow",
            r#"{"StringEquals":{"kms:EncryptionContext:team":"a"}}"#,
        );
        check(
            &p,
            Rq {
                ec,
                ..rq("Encrypt")
            },
            NoMatch,
        );
        let p = stmt(
            "Allow",
            r#"{"StringNotEquals":{"kms:EncryptionContext:team":"a"}}"#,
        );
        check(
            &p,
            Rq {
                ec,
                ..rq("Encrypt")
            },
            Allow,
        );
        let p = stmt(
            "Allow",
            r#"{"StringEqualsIfExists":{"kms:EncryptionContext:team":"a"}}"#,
        );
        check(
            &p,
            Rq {
                ec,
                ..rq("Encrypt")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                ec: &[("team", "b")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        // Null.
        let p = stmt("Allow", r#"{"Null":{"kms:EncryptionContextKeys":"false"}}"#);
        check(
            &p,
            Rq {
                ec,
                ..rq("Encrypt")
            },
            Allow,
        );
        check(&p, rq("Encrypt"), NoMatch);
        let p = deny_with(r#"{"Null":{"kms:EncryptionContextKeys":"true"}}"#);
        check(&p, rq("Encrypt"), Deny);
        check(
            &p,
            Rq {
                ec,
                ..rq("Encrypt")
            },
            Allow,
        );
        // kms:ViaService is never present: an Allow requiring it never applies, a Deny
        // "unless via a service" always does.
        let p = stmt(
            "Allow",
            r#"{"StringEquals":{"kms:ViaService":"s3.us-east-1.amazonaws.com"}}"#,
        );
        check(&p, rq("Decrypt"), NoMatch);
        let p = deny_with(r#"{"StringNotEquals":{"kms:ViaService":"s3.us-east-1.amazonaws.com"}}"#);
        check(&p, rq("Decrypt"), Deny);
    }

    #[test]
    fn set_operators() {
        let p = stmt(
            "Allow",
            r#"{"ForAllValues:StringEquals":{"kms:GrantOperations":["Encrypt","Decrypt"]}}"#,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt|Decrypt")],
                ..rq("CreateGrant")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt")],
                ..rq("CreateGrant")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt|CreateGrant")],
                ..rq("CreateGrant")
            },
            NoMatch,
        );
        // ForAllValues with no values: true (AWS), so pair it with Null in real policies.
        check(&p, rq("CreateGrant"), Allow);
        let p = stmt(
            "Allow",
            r#"{"ForAnyValue:StringEquals":{"kms:EncryptionContextKeys":"tenant"}}"#,
        );
        check(
            &p,
            Rq {
                ec: &[("tenant", "a"), ("x", "y")],
                ..rq("Encrypt")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                ec: &[("x", "y")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        check(&p, rq("Encrypt"), NoMatch);
        // ForAnyValue:StringLike on aliases.
        let p = stmt(
            "Allow",
            r#"{"ForAnyValue:StringLike":{"kms:ResourceAliases":"alias/finance-*"}}"#,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:ResourceAliases", "alias/x|alias/finance-eu")],
                ..rq("Decrypt")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:ResourceAliases", "alias/x|alias/Finance-eu")],
                ..rq("Decrypt")
            },
            NoMatch,
        );
        // Deny any grant that includes Decrypt.
        let p = deny_with(r#"{"ForAnyValue:StringEquals":{"kms:GrantOperations":"Decrypt"}}"#);
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt|Decrypt")],
                ..rq("CreateGrant")
            },
            Deny,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt")],
                ..rq("CreateGrant")
            },
            Allow,
        );
        // Single-valued operator on a multi-valued key.
        let p = deny_with(r#"{"StringNotEquals":{"kms:GrantOperations":["Encrypt","Decrypt"]}}"#);
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt|Decrypt")],
                ..rq("CreateGrant")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Encrypt|Sign")],
                ..rq("CreateGrant")
            },
            Allow,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantOperations", "Sign")],
                ..rq("CreateGrant")
            },
            Deny,
        );
    }

    #[test]
    fn typed_operators() {
        // Bool.
        let p = deny_with(r#"{"Bool":{"kms:GrantIsForAWSResource":"false"}}"#);
        check(
            &p,
            Rq {
                keys: &[("kms:GrantIsForAWSResource", "false")],
                ..rq("CreateGrant")
            },
            Deny,
        );
        check(
            &p,
            Rq {
                keys: &[("kms:GrantIsForAWSResource", "true")],
                ..rq("CreateGrant")
            },
            Allow,
        );
        check(&p, rq("Encrypt"), Allow);
        // Dates and numbers on the clock (2025-12-05T12:00:00Z in these tests).
        let p = stmt(
            "Allow",
            r#"{"DateLessThan":{"aws:CurrentTime":"2026-01-01T00:00:00Z"}}"#,
        );
        check(&p, rq("Encrypt"), Allow);
        let p = stmt(
            "Allow",
            r#"{"DateGreaterThan":{"aws:CurrentTime":"2025-12-05T12:00:01+00:00"}}"#,
        );
        check(&p, rq("Encrypt"), NoMatch);
        let p = stmt(
            "Allow",
            r#"{"DateGreaterThanEquals":{"aws:EpochTime":"2025-12-05"}}"#,
        );
        check(&p, rq("Encrypt"), Allow);
        let p = stmt(
            "Allow",
            r#"{"NumericLessThan":{"aws:EpochTime":1764936001}}"#,
        );
        check(&p, rq("Encrypt"), Allow);
        let p = stmt(
            "Allow",
            r#"{"NumericGreaterThanEquals":{"aws:EpochTime":"1764936001"}}"#,
        );
        check(&p, rq("Encrypt"), NoMatch);
        let p = deny_with(r#"{"NumericNotEquals":{"aws:EpochTime":"1764936000"}}"#);
        check(&p, rq("Encrypt"), Allow);
        // ARNs, component by component.
        let p = stmt(
            "Allow",
            r#"{"ArnLike":{"aws:PrincipalArn":"arn:aws:iam::*:user/ali*"}}"#,
        );
        check(&p, rq("Encrypt"), Allow);
        check(
            &p,
            Rq {
                principal: "arn:aws:iam::111122223333:user/bob",
                ..rq("Encrypt")
            },
            NoMatch,
        );
        let p = stmt(
            "Allow",
            r#"{"ArnLike":{"aws:PrincipalArn":"arn:aws:iam::*"}}"#,
        );
        check(&p, rq("Encrypt"), NoMatch);
        let p = deny_with(
            r#"{"ArnNotEquals":{"aws:PrincipalArn":"arn:aws:iam::111122223333:user/alice"}}"#,
        );
        check(&p, rq("Encrypt"), Allow);
        check(
            &p,
            Rq {
                principal: "arn:aws:iam::111122223333:user/mallory",
                ..rq("Encrypt")
            },
            Deny,
        );
    }

    #[test]
    fn kms_keys_of_the_key_and_request() {
        let keys = &[
            ("kms:KeySpec", "SYMMETRIC_DEFAULT"),
            ("kms:KeyUsage", "ENCRYPT_DECRYPT"),
            ("kms:KeyOrigin", "AWS_KMS"),
            ("kms:RequestAlias", "alias/app"),
        ][..];
        for (cond, expect) in [
            (
                r#"{"StringEquals":{"kms:KeySpec":"SYMMETRIC_DEFAULT"}}"#,
                Allow,
            ),
            (
                r#"{"StringEquals":{"kms:KeyUsage":"SIGN_VERIFY"}}"#,
                NoMatch,
            ),
            (
                r#"{"StringEquals":{"kms:KeyOrigin":["EXTERNAL","AWS_KMS"]}}"#,
                Allow,
            ),
            (
                r#"{"StringEquals":{"kms:RequestAlias":"alias/app"}}"#,
                Allow,
            ),
            (
                r#"{"StringLike":{"kms:RequestAlias":"alias/APP"}}"#,
                NoMatch,
            ),
            (
                r#"{"StringEquals":{"kms:CallerAccount":"111122223333"}}"#,
                Allow,
            ),
            (
                r#"{"StringEquals":{"aws:PrincipalAccount":"999999999999"}}"#,
                NoMatch,
            ),
            (
                r#"{"StringEquals":{"kms:CallerAccount":"111122223333","kms:KeyUsage":"ENCRYPT_DECRYPT"}}"#,
                Allow,
            ),
            (
                r#"{"StringEquals":{"kms:CallerAccount":"111122223333"},"StringLike":{"kms:KeySpec":"RSA_*"}}"#,
                NoMatch,
            ),
        ] {
            check(
                &stmt("Allow", cond),
                Rq {
                    keys,
                    ..rq("Decrypt")
                },
                expect,
            );
        }
    }

    #[test]
    fn deny_wins_and_actions_and_resources() {
        let p = r#"{"Statement":[
            {"Effect":"Allow","Principal":{"AWS":"*"},"Action":["kms:Encrypt","kms:Decrypt","kms:Describe*"],"Resource":"*",
             "Condition":{"StringEquals":{"kms:EncryptionContext:app":"billing"}}},
            {"Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*","Condition":{"StringLike":{"aws:PrincipalArn":"*:user/intern*"}}}]}"#;
        let ec = &[("app", "billing")][..];
        check(
            p,
            Rq {
                ec,
                ..rq("Encrypt")
            },
            Allow,
        );
        check(
            p,
            Rq {
                ec: &[("app", "hr")],
                ..rq("Encrypt")
            },
            NoMatch,
        );
        check(p, rq("Encrypt"), NoMatch);
        check(
            p,
            Rq {
                ec,
                principal: "arn:aws:iam::111122223333:user/intern1",
                ..rq("Decrypt")
            },
            Deny,
        );
        check(p, Rq { ec, ..rq("Sign") }, NoMatch);
        // Action names are case-insensitive; NotAction.
        let p = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"KMS:encrypt","Resource":"*"}}"#;
        check(p, rq("Encrypt"), Allow);
        let p = r#"{"Statement":[{"Effect":"Allow","Principal":"*","NotAction":"kms:Decrypt","Resource":"*"}]}"#;
        check(p, rq("Encrypt"), Allow);
        check(p, rq("Decrypt"), NoMatch);
        // Resource names this key or another.
        let p = format!(
            r#"{{"Statement":[{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"{KEY}"}}]}}"#
        );
        check(&p, rq("Encrypt"), Allow);
        let p = r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"arn:aws:kms:us-east-1:111122223333:key/other"}]}"#;
        check(p, rq("Encrypt"), NoMatch);
        // Service principals match no caas caller.
        let p = r#"{"Statement":[{"Effect":"Allow","Principal":{"Service":"logs.amazonaws.com"},"Action":"kms:*","Resource":"*"}]}"#;
        check(p, rq("Encrypt"), NoMatch);
    }

    #[test]
    fn globs_and_dates() {
        assert!(glob("kms:*", "kms:Encrypt", false));
        assert!(glob("kms:Generate*", "kms:GenerateDataKey", false));
        assert!(!glob("kms:Generate*", "kms:Encrypt", false));
        assert!(glob("a?c", "abc", false));
        assert!(!glob("A?c", "abc", false));
        assert!(glob("A?c", "abc", true));
        assert!(glob("*", "", false));
        assert!(!glob("a*", "", false));
        assert!(glob("kms:Encrypt", "KMS:encrypt", true));
        assert!(!glob("kms:Encrypt", "kms:encrypt", false));
        assert!(glob("KMS:*", "kms:Decrypt", true));
        assert!(!glob("KMS:*", "kms:Decrypt", false));
        assert!(!glob("abc*", "ab", false));
        assert!(glob("a*c*", "abxcy", false));
        assert!(glob("é*", "éa", false));
        assert_eq!(parse_date_ms("1970-01-01"), Some(0));
        assert_eq!(parse_date_ms("1970-01-01T00:01:00Z"), Some(60_000));
        assert_eq!(parse_date_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_date_ms("1970-01-01T00:00:00.999Z"), Some(0));
        assert_eq!(parse_date_ms("60"), Some(60_000));
        for bad in [
            "",
            "1970-13-01",
            "1970-01-01T25:00:00Z",
            "x",
            "1970-01-01T00:00:00Q",
            "99999999999999999999",
        ] {
            assert_eq!(parse_date_ms(bad), None, "{bad}");
        }
    }
}
