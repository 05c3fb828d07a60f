//! The stop-job validators: job IDs and bodies, no panic on any input, and an
//! accepted body is JSON whose `status` is `Stopping`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zuora_gateway::policy::stop_job::{check_job_id, check_stop_body};

fuzz_target!(|data: &[u8]| {
    if check_stop_body(data).is_ok() {
        let v: serde_json::Value = serde_json::from_slice(data).expect("accepted body is JSON");
        assert_eq!(v["status"], "Stopping");
    }
    if let Ok(id) = std::str::from_utf8(data) {
        let _ = check_job_id("jobId", id);
    }
});
