//! Sizing and growing a sandbox's VM, against the fake VMM and agent.

use std::sync::Arc;

use hypervisor::VmSize;
use oci_spec::runtime::Spec;

use crate::agent::fake::{Call, FakeAgent};
use crate::fake_vm::FakeHypervisor;
use crate::io::IoPaths;
use crate::lifecycle::ErrorKind;
use crate::lifecycle_tests::{host, options};
use crate::resources::Limits;
use crate::{Rootfs, Sandbox};

const MIB: i64 = 1024 * 1024;

struct Pod {
    sandbox: Sandbox,
    agent: FakeAgent,
    hv: Arc<FakeHypervisor>,
    dir: tempfile::TempDir,
}

/// A pod on `machine`; `own` is its sandbox container's limits (a `ctr` task's).
async fn pod(machine: &str, static_resources: bool, own: Limits) -> Pod {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start().await;
    let hv = Arc::new(FakeHypervisor::default());
    let mut opts = options(dir.path());
    opts.config.hypervisor.machine_type = machine.to_string();
    opts.config.runtime.static_sandbox_resource_mgmt = static_resources;
    opts.resources.own = own;
    let sandbox = Sandbox::start(opts, host(&agent, &hv)).await.expect("the sandbox starts");
    Pod { sandbox, agent, hv, dir }
}

fn spec_with(memory_mib: i64) -> Spec {
    let mut spec = Spec::default();
    let mut linux = spec.linux().clone().expect("the default spec has a linux section");
    let resources = format!(r#"{{"memory":{{"limit":{}}}}}"#, memory_mib * MIB);
    linux.set_resources(Some(serde_json::from_str(&resources).expect("resources")));
    spec.set_linux(Some(linux));
    spec
}

fn memory_update(memory_mib: i64) -> Vec<u8> {
    format!(r#"{{"memory":{{"limit":{}}}}}"#, memory_mib * MIB).into_bytes()
}

impl Pod {
    async fn create(&self, id: &str, spec: &Spec) {
        let rootfs = self.dir.path().join(id);
        std::fs::create_dir_all(&rootfs).expect("rootfs dir");
        self.sandbox
            .create(id, spec, &Rootfs::Dir(rootfs), "/bundle", IoPaths::default(), false)
            .await
            .expect("container created");
    }

    fn vm_memory(&self) -> u32 {
        self.hv.vms()[0].current_size().memory_mib
    }
}

#[tokio::test]
async fn the_vm_starts_at_the_base_plus_the_tasks_own_limits() {
    let pod = pod("microvm", false, Limits { milli_cpus: 0, memory_mib: 512 }).await;
    assert_eq!(pod.hv.vms()[0].config().memory_mib, 256 + 512);
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn containers_beyond_the_vm_grow_it_and_the_guest_onlines_what_was_added() {
    let pod = pod("q35", false, Limits::default()).await;
    assert_eq!(pod.vm_memory(), 256);
    pod.create("c1", &spec_with(512)).await;
    assert_eq!(pod.vm_memory(), 256 + 512);
    assert!(pod.agent.calls().iter().any(|c| matches!(c, Call::OnlineCpuMem(_))), "{:?}", pod.agent.calls());

    pod.sandbox.update("c1", &memory_update(1024)).await.expect("update grows the VM");
    assert_eq!(pod.vm_memory(), 256 + 1024);
    // Within what the VM holds: no resize at all.
    let resizes = pod.hv.vms()[0].resizes().len();
    pod.sandbox.update("c1", &memory_update(768)).await.expect("update within the VM");
    assert_eq!(pod.hv.vms()[0].resizes().len(), resizes);
    assert_eq!(pod.vm_memory(), 256 + 1024, "the VM never shrinks");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn an_update_the_vm_cannot_hold_is_refused_with_the_reason() {
    let pod = pod("microvm", false, Limits::default()).await;
    pod.hv.vms()[0].refuse_resizes(Some("microvm cannot hot-plug CPUs or memory"));
    // A container created beyond the VM still runs, in what the VM has.
    pod.create("c1", &spec_with(512)).await;
    assert_eq!(pod.vm_memory(), 256);
    let err = pod.sandbox.update("c1", &memory_update(1024)).await.expect_err("cannot grow");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let text = crate::error_chain(&err);
    assert!(text.contains("microvm cannot hot-plug"), "{text}");
    let updates = pod.agent.calls().into_iter().filter(|c| matches!(c, Call::UpdateContainer { .. })).count();
    assert_eq!(updates, 0, "the guest's limit is not raised past what the VM has");
    // Limits that fit in the VM without the guest's own share are taken.
    pod.sandbox.update("c1", &memory_update(200)).await.expect("fits in 256 MiB");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn static_resource_management_never_grows_the_vm() {
    let pod = pod("q35", true, Limits::default()).await;
    pod.create("c1", &Spec::default()).await;
    let err = pod.sandbox.update("c1", &memory_update(1024)).await.expect_err("static");
    assert!(crate::error_chain(&err).contains("static_sandbox_resource_mgmt"), "{err}");
    pod.sandbox.update("c1", &memory_update(128)).await.expect("fits without growing");
    assert_eq!(pod.hv.vms()[0].resizes(), Vec::<VmSize>::new());
    pod.sandbox.stop().await.expect("stop");
}
