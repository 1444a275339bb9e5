//! JSON Schema of the policy file, generated from the same serde types that
//! load it, so editors validate exactly what the loader accepts.

use crate::model::PolicyFile;
use crate::testing::TestFile;

/// The policy file's schema, pretty-printed, with a trailing newline.
pub fn policy_schema_json() -> String {
    pretty(schemars::schema_for!(PolicyFile))
}

/// The policy test file's schema.
pub fn tests_schema_json() -> String {
    pretty(schemars::schema_for!(TestFile))
}

fn pretty(schema: schemars::Schema) -> String {
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in schema (used by the examples' `yaml-language-server`
    /// line) must match the types. Regenerate with
    /// `cargo run -p egress-gateway -- policy schema > policy/policy.schema.json`.
    #[test]
    fn checked_in_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.schema.json");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == policy_schema_json(),
            "{path} is stale; regenerate: cargo run -p egress-gateway -- policy schema > policy/policy.schema.json"
        );
    }

    #[test]
    fn schema_is_strict() {
        let v: serde_json::Value = serde_json::from_str(&policy_schema_json()).unwrap();
        assert_eq!(v["additionalProperties"], false);
        assert_eq!(v["$defs"]["PathwaySpec"]["additionalProperties"], false);
        assert!(v["properties"]["trust_domains"].is_object());
        let t: serde_json::Value = serde_json::from_str(&tests_schema_json()).unwrap();
        assert!(t["properties"]["tests"].is_object());
    }
}
