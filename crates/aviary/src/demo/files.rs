//! Files the demo writes: the shipped `cicd` pack and the sample application.
//! Embedded at build time so `aviary demo` works from the binary alone.

/// The `cicd` pack (`packs/cicd` in the source tree), path -> text.
pub const CICD_PACK: &[(&str, &str)] = &[
    (
        "actions/ci.yaml",
        include_str!("../../../../packs/cicd/actions/ci.yaml"),
    ),
    (
        "actions/notify.yaml",
        include_str!("../../../../packs/cicd/actions/notify.yaml"),
    ),
    (
        "actions/package_and_canary.yaml",
        include_str!("../../../../packs/cicd/actions/package_and_canary.yaml"),
    ),
    (
        "actions/promote.yaml",
        include_str!("../../../../packs/cicd/actions/promote.yaml"),
    ),
    (
        "actions/rollback.yaml",
        include_str!("../../../../packs/cicd/actions/rollback.yaml"),
    ),
    (
        "actions/workflows/ci.yaml",
        include_str!("../../../../packs/cicd/actions/workflows/ci.yaml"),
    ),
    (
        "actions/workflows/notify.yaml",
        include_str!("../../../../packs/cicd/actions/workflows/notify.yaml"),
    ),
    (
        "actions/workflows/package_and_canary.yaml",
        include_str!("../../../../packs/cicd/actions/workflows/package_and_canary.yaml"),
    ),
    (
        "actions/workflows/promote.yaml",
        include_str!("../../../../packs/cicd/actions/workflows/promote.yaml"),
    ),
    (
        "actions/workflows/rollback.yaml",
        include_str!("../../../../packs/cicd/actions/workflows/rollback.yaml"),
    ),
    (
        "config.yaml",
        include_str!("../../../../packs/cicd/config.yaml"),
    ),
    (
        "pack.yaml",
        include_str!("../../../../packs/cicd/pack.yaml"),
    ),
    (
        "rules/on_ci_failed.yaml",
        include_str!("../../../../packs/cicd/rules/on_ci_failed.yaml"),
    ),
    (
        "rules/on_ci_succeeded.yaml",
        include_str!("../../../../packs/cicd/rules/on_ci_succeeded.yaml"),
    ),
    (
        "rules/on_push.yaml",
        include_str!("../../../../packs/cicd/rules/on_push.yaml"),
    ),
    (
        "rules/rollback_on_alarm.yaml",
        include_str!("../../../../packs/cicd/rules/rollback_on_alarm.yaml"),
    ),
    (
        "tests/auto_promote.yaml",
        include_str!("../../../../packs/cicd/tests/auto_promote.yaml"),
    ),
    (
        "tests/ci_builds_main.yaml",
        include_str!("../../../../packs/cicd/tests/ci_builds_main.yaml"),
    ),
    (
        "tests/ci_failure_is_not_retried.yaml",
        include_str!("../../../../packs/cicd/tests/ci_failure_is_not_retried.yaml"),
    ),
    (
        "tests/ci_retried_after_a_crash.yaml",
        include_str!("../../../../packs/cicd/tests/ci_retried_after_a_crash.yaml"),
    ),
    (
        "tests/ci_skips_other_branches.yaml",
        include_str!("../../../../packs/cicd/tests/ci_skips_other_branches.yaml"),
    ),
    (
        "tests/notify_only_when_configured.yaml",
        include_str!("../../../../packs/cicd/tests/notify_only_when_configured.yaml"),
    ),
    (
        "tests/package_failure_deploys_nothing.yaml",
        include_str!("../../../../packs/cicd/tests/package_failure_deploys_nothing.yaml"),
    ),
    (
        "tests/package_then_canary.yaml",
        include_str!("../../../../packs/cicd/tests/package_then_canary.yaml"),
    ),
];

/// The sample application (a small HTTP service that follows the
/// conventions), path -> (text, executable).
pub const SAMPLE_APP: &[(&str, &str, bool)] = &[
    ("app.py", include_str!("sample/app.py"), true),
    ("fpm.json", include_str!("sample/fpm.json"), false),
    (
        "script/cibuild",
        include_str!("sample/script/cibuild"),
        true,
    ),
    (
        "script/cisetup",
        include_str!("sample/script/cisetup"),
        true,
    ),
    (
        "script/post-inst",
        include_str!("sample/script/post-inst"),
        true,
    ),
    ("test_app.py", include_str!("sample/test_app.py"), true),
];
