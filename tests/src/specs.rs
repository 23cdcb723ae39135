//! Pipeline specs the tests share.

/// Pipeline `name` of service "hello": one stage "prod" over every
/// env=prod host with `stage_keys` (TOML lines: batches, gate, timeouts),
/// starting with canary `steps` (a TOML array of tables) judged with
/// `analysis` (TOML lines of `[stages.canary.analysis]`, may be empty).
pub fn canary_pipeline(name: &str, stage_keys: &str, steps: &str, analysis: &str) -> String {
    format!(
        r#"
name = "{name}"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
{stage_keys}

[stages.canary]
steps = {steps}

[stages.canary.analysis]
{analysis}
"#
    )
}
