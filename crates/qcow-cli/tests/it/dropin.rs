//! `qcow` invoked as `qemu-img` (through a link of that name, as a drop-in
//! installs it): messages start with the name it was invoked by, and the
//! messages scripts match on read as qemu-img's.

use std::process::Command;

use super::qemu_img;

#[test]
fn messages_carry_the_invoked_name_and_qemu_img_wording() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qcow"), &link).expect("symlink");
    let missing = dir.path().join("nothere.qcow2");
    let missing = missing.to_str().expect("utf-8");
    let ours = Command::new(&link)
        .args(["info", missing])
        .output()
        .expect("run through the link");
    let theirs = qemu_img(&["info", missing]);
    assert_eq!(ours.status.code(), theirs.status.code());
    let ours_err = String::from_utf8_lossy(&ours.stderr);
    let expected = format!("qemu-img: Could not open '{missing}': ");
    assert!(ours_err.starts_with(&expected), "{ours_err}");
    assert!(
        ours_err.trim_end().ends_with("No such file or directory"),
        "{ours_err}"
    );
    assert!(String::from_utf8_lossy(&theirs.stderr).starts_with(&expected));
    // Usage errors name it too, and exit 1.
    let usage = Command::new(&link)
        .args(["info", "--bogus"])
        .output()
        .expect("run through the link");
    assert_eq!(usage.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("qemu-img info"));
}
