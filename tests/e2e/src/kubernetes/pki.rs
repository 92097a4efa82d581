//! The cluster's certificates, made with the `openssl` command line: one CA, the API server's serving
//! certificate, a client certificate per component, and the service-account signing key. EC P-256 keys,
//! valid for two days: the cluster lives for one test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A key and the certificate the CA signed for it.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: Pair,
    pub apiserver: Pair,
    pub admin: Pair,
    pub kubelet: Pair,
    pub controller_manager: Pair,
    pub scheduler: Pair,
    /// The API server's client certificate towards kubelets.
    pub apiserver_kubelet: Pair,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().map_err(|e| format!("run openssl: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn new_key(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let key = format!("{name}.key");
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key])?;
    Ok(dir.join(key))
}

/// A certificate for `subject` signed by the CA in `dir`; `san` adds subjectAltNames (a serving certificate).
fn signed(dir: &Path, name: &str, subject: &str, san: Option<&str>) -> Result<Pair, String> {
    new_key(dir, name)?;
    let (key, csr, cert, ext) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
    openssl(dir, &["req", "-new", "-key", &key, "-out", &csr, "-subj", subject])?;
    let usage = match san {
        Some(san) => format!("subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        None => "extendedKeyUsage=clientAuth\n".to_owned(),
    };
    std::fs::write(dir.join(&ext), format!("keyUsage=critical,digitalSignature,keyEncipherment\n{usage}"))
        .map_err(|e| e.to_string())?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
    )?;
    Ok(Pair { cert: dir.join(cert), key: dir.join(key) })
}

impl Pki {
    /// Makes everything in `dir`; `node` is the kubelet's node name (its certificate's `system:node:<node>`).
    pub fn create(dir: &Path, node: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        new_key(dir, "ca")?;
        openssl(
            dir,
            &["req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-out", "ca.crt", "-subj", "/CN=kata-e2e-ca"],
        )?;
        let ca = Pair { cert: dir.join("ca.crt"), key: dir.join("ca.key") };
        let san =
            "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc";
        let service_account_key = new_key(dir, "service-account")?;
        openssl(dir, &["pkey", "-in", "service-account.key", "-pubout", "-out", "service-account.pub"])?;
        Ok(Pki {
            ca,
            apiserver: signed(dir, "apiserver", "/CN=kube-apiserver", Some(san))?,
            admin: signed(dir, "admin", "/O=system:masters/CN=kata-e2e-admin", None)?,
            kubelet: signed(dir, "kubelet", &format!("/O=system:nodes/CN=system:node:{node}"), None)?,
            controller_manager: signed(dir, "controller-manager", "/CN=system:kube-controller-manager", None)?,
            scheduler: signed(dir, "scheduler", "/CN=system:kube-scheduler", None)?,
            apiserver_kubelet: signed(
                dir,
                "apiserver-kubelet",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
                None,
            )?,
            service_account_key,
            service_account_pub: dir.join("service-account.pub"),
        })
    }

    /// A kubeconfig for the client `pair` against the API server at `server`.
    pub fn kubeconfig(&self, pair: &Pair, server: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    \
             certificate-authority: {ca}\nusers:\n- name: e2e\n  user:\n    client-certificate: {cert}\n    \
             client-key: {key}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e\n\
             current-context: e2e\n",
            ca = self.ca.cert.display(),
            cert = pair.cert.display(),
            key = pair.key.display(),
        )
    }
}
