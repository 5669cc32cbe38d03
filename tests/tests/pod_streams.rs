//! What `kubectl attach`, `kubectl exec -it` and a terminal resize do, and what capabilities
//! and CheckpointContainer answer, side by side on runc and on shoji (containerd 1.7 and 2.x)
//! with the same expectations. The difference: runc's checkpoint needs CRIU (not installed
//! here) and shoji refuses checkpoints outright; both must answer with an error, and shoji's
//! names what it cannot do.
use std::time::Duration;

use shoji_tests::{
    cri::{self, api, tty_session, Input},
    image::BUSYBOX,
    pods::{check, security, sh_ok, Pods},
    scenario::{self, Env},
    side_by_side,
};

const SESSION: Duration = Duration::from_secs(60);

type Result<T = ()> = scenario::Result<T>;

/// Resizes the terminal twice and asks `stty size` each time; the last input is `last`.
fn resize_and_ask<'a>(last: &'a str) -> [(Input<'a>, &'a str); 5] {
    [
        (
            Input::Resize {
                width: 100,
                height: 40,
            },
            "",
        ),
        (Input::Type("stty size\n"), "40 100"),
        (
            Input::Resize {
                width: 132,
                height: 50,
            },
            "",
        ),
        (Input::Type("stty size\n"), "50 132"),
        (Input::Type(last), ""),
    ]
}

/// Attach to a tty container's shell and exec a tty shell beside it; both follow resizes.
async fn attach_exec_and_resize(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("tty", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let mut c = cri::container_config("shell", BUSYBOX, &["sh"]);
        c.tty = true;
        c.stdin = true;
        let id = pods.start(&pod, &cfg, &c).await?;

        let url = cri.attach_url(&id, true).await?;
        let out = tty_session(&url, &resize_and_ask("echo attached-$((6*7))\n"), SESSION).await?;
        check(out.contains("40 100") && out.contains("50 132"), || {
            format!("attach: the shell did not see both sizes: {out:?}")
        })?;
        // The attach's input reached the init: it is still the same shell.
        let url = cri.attach_url(&id, true).await?;
        tty_session(
            &url,
            &[(Input::Type("echo again-$((6*7))\n"), "again-42")],
            SESSION,
        )
        .await?;

        let url = cri.exec_url(&id, &["sh"], true, true).await?;
        let out = tty_session(&url, &resize_and_ask("exit\n"), SESSION).await?;
        check(out.contains("40 100") && out.contains("50 132"), || {
            format!("exec -it: the shell did not see both sizes: {out:?}")
        })
    })
    .await
}

/// The effective capability set of a container's processes.
async fn cap_eff(cri: &cri::Cri, id: &str) -> Result<String> {
    sh_ok(cri, id, "grep ^CapEff: /proc/self/status | cut -f2").await
}

/// A capabilities case: name, added, dropped, privileged, the `CapEff` wanted.
type Caps<'a> = (&'a str, &'a [&'a str], &'a [&'a str], bool, &'a str);

/// containerd's default set, one added, all dropped, and privileged.
async fn capabilities(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("caps", "shoji-test", work.path());
        cfg.linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
        let pod = pods.run(&cfg).await?;
        // containerd's default set; with SYS_ADMIN (bit 21); none; privileged: what containerd
        // itself may grant (its bounding set, this test's here), in the guest too.
        let host = std::fs::read_to_string("/proc/self/status")?;
        let bounding = host
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .ok_or("no CapBnd in /proc/self/status")?
            .trim()
            .to_string();
        let cases: [Caps; 4] = [
            ("default", &[], &[], false, "00000000a80425fb"),
            ("add", &["SYS_ADMIN"], &[], false, "00000000a82425fb"),
            ("drop", &[], &["ALL"], false, "0000000000000000"),
            ("privileged", &[], &[], true, &bounding),
        ];
        for (name, add, drop, privileged, want) in cases {
            let mut c = cri::container_config(name, BUSYBOX, &["sleep", "1000"]);
            let s = security(&mut c);
            s.privileged = privileged;
            s.capabilities = Some(api::Capability {
                add_capabilities: add.iter().map(|c| c.to_string()).collect(),
                drop_capabilities: drop.iter().map(|c| c.to_string()).collect(),
                ..Default::default()
            });
            let id = pods.start(&pod, &cfg, &c).await?;
            let got = cap_eff(&cri, &id).await?;
            check(got == want, || format!("{name}: CapEff {got}, want {want}"))?;
        }
        Ok(())
    })
    .await
}

/// CheckpointContainer fails without harm: the container keeps running.
async fn checkpoint_is_refused(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let shoji = env.runtime.cri_handler == "shoji";
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("checkpoint", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let c = cri::container_config("c", BUSYBOX, &["sleep", "1000"]);
        let id = pods.start(&pod, &cfg, &c).await?;
        let archive = work.path().join("checkpoint.tar");
        match cri.checkpoint(&id, &archive).await {
            Ok(()) => return Err("CheckpointContainer succeeded".into()),
            // containerd 1.7 answers for itself: it has no CRI checkpoint.
            Err(e) if shoji => check(e.to_string().to_lowercase().contains("checkpoint"), || {
                format!("the refusal does not name the checkpoint: {e}")
            })?,
            Err(_) => {}
        }
        check(!archive.exists(), || {
            "a failed checkpoint left an archive".into()
        })?;
        sh_ok(&cri, &id, "true").await.map(drop)
    })
    .await
}

side_by_side!(attach_exec_and_resize, 180);
side_by_side!(capabilities, 184);
side_by_side!(checkpoint_is_refused, 188);
