//! The site file `kakehashi provision --site` reads: what a field engineer
//! knows about the hospital and the reading center, turned into the box's
//! `kakehashi.toml` ([`Site::config_text`]), which is then validated like any
//! config. Strict: an unknown key is an error that names it.

use std::path::Path;

use serde::Deserialize;

/// The site file: what a field engineer knows about the hospital and the center.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    site: SiteInfo,
    #[serde(rename = "box")]
    box_: BoxSection,
    #[serde(default)]
    pacs: Vec<Pacs>,
    center: Center,
    #[serde(default)]
    tpm: SiteTpm,
    #[serde(default)]
    spool: SiteSpool,
    /// The appliance image's ports; copied into the config as it is.
    network: Option<SiteNetwork>,
    /// The clinical round trip, copied into the config as written (keys as
    /// in kakehashi.toml), with `[pacs]` made from the first `[[pacs]]`:
    /// reports back (`[results]`: `listen` defaults to the tunnel address,
    /// port 11114, `from` to the center's AE title), priors, urgent findings.
    results: Option<toml::Table>,
    priors: Option<toml::Table>,
    urgent: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteNetwork {
    lan: SitePort,
    wan: SitePort,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    ntp: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SitePort {
    interface: String,
    address: String,
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteInfo {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoxSection {
    #[serde(default = "default_ae")]
    ae_title: String,
    #[serde(default = "default_listen")]
    listen: String,
    tunnel_address: String,
    tunnel_interface: Option<String>,
    control_socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pacs {
    ae_title: String,
    address: String,
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Center {
    #[serde(default = "default_center_name")]
    name: String,
    ae_title: String,
    dicom_address: String,
    wg_public_key: String,
    wg_endpoint: String,
    allowed_ips: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteTpm {
    /// "tpm" (default) or "software" (development only).
    backend: Option<String>,
    tcti: Option<String>,
    key_dir: Option<String>,
    /// PCRs to bind the sealed keys to (SHA-256 bank). Unset: PCR 7 (the
    /// Secure Boot state, which every release signed with the build's key
    /// keeps, docs/updates.md); `[]`: none.
    pcrs: Option<Vec<u8>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteSpool {
    dir: Option<String>,
    max_size: Option<String>,
}

fn default_ae() -> String {
    "KAKEHASHI".into()
}
fn default_listen() -> String {
    "0.0.0.0:104".into()
}
fn default_center_name() -> String {
    "reading-center".into()
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

impl Site {
    pub fn load(path: &Path) -> Result<Site, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read site file {}: {e}", path.display()))?;
        Site::parse(&text).map_err(|e| format!("site file {} is not valid: {e}", path.display()))
    }

    /// Parses site file text (strict: an unknown key is an error naming it).
    pub fn parse(text: &str) -> Result<Site, String> {
        let site: Site = toml::from_str(text).map_err(|e| e.to_string())?;
        if (site.results.is_some() || site.priors.is_some()) && site.pacs.is_empty() {
            return Err(
                "[results] and [priors] need a [[pacs]] entry with a port: the hospital's PACS the box queries and delivers reports to".into(),
            );
        }
        if site.urgent.is_some() && site.results.is_none() {
            return Err(
                "[urgent] needs [results]: urgent findings are results from the center".into(),
            );
        }
        Ok(site)
    }

    /// The box's tunnel address without its prefix (`10.8.0.2`).
    pub fn tunnel_ip(&self) -> &str {
        self.box_
            .tunnel_address
            .split('/')
            .next()
            .unwrap_or_default()
    }

    /// The box's kakehashi.toml for this site.
    pub fn config_text(&self, site_path: &Path) -> String {
        let b = &self.box_;
        let c = &self.center;
        let mut t = format!(
            "# Written by `kakehashi provision --site {}` for site {}.\n# Change the site file and provision again rather than editing this file.\n\n[dicom]\nae_title = {}\nlisten = {}\n",
            site_path.display(),
            q(&self.site.name),
            q(&b.ae_title),
            q(&b.listen)
        );
        for p in &self.pacs {
            t += &format!(
                "\n[[dicom.sources]]\nae_title = {}\naddress = {}\n",
                q(&p.ae_title),
                q(&p.address)
            );
            if let Some(port) = p.port {
                t += &format!("port = {port}\n");
            }
        }
        t += &format!(
            "\n[[destinations]]\nname = {}\nae_title = {}\naddress = {}\n",
            q(&c.name),
            q(&c.ae_title),
            q(&c.dicom_address)
        );
        t += &format!(
            "\n[spool]\ndir = {}\nmax_size = {}\n",
            q(self
                .spool
                .dir
                .as_deref()
                .unwrap_or("/var/lib/kakehashi/spool")),
            q(self.spool.max_size.as_deref().unwrap_or("50 GiB"))
        );
        if let Some(s) = &b.control_socket {
            t += &format!("\n[control]\nsocket = {}\n", q(s));
        }
        t += "\n[tunnel]\n";
        if let Some(i) = &b.tunnel_interface {
            t += &format!("interface = {}\n", q(i));
        }
        t += &format!(
            "address = {}\n\n[tunnel.peer]\npublic_key = {}\nendpoint = {}\nallowed_ips = {}\n",
            list(std::slice::from_ref(&b.tunnel_address)),
            q(&c.wg_public_key),
            q(&c.wg_endpoint),
            list(&c.allowed_ips)
        );
        if let (Some(p), true) = (
            self.pacs.first(),
            self.results.is_some() || self.priors.is_some(),
        ) {
            t += &format!(
                "\n[pacs]\nae_title = {}\naddress = {}\n",
                q(&p.ae_title),
                q(&format!("{}:{}", p.address, p.port.unwrap_or(104)))
            );
        }
        let mut round_trip = toml::Table::new();
        if let Some(r) = &self.results {
            let mut r = r.clone();
            r.entry("listen")
                .or_insert_with(|| format!("{}:11114", self.tunnel_ip()).into());
            r.entry("from")
                .or_insert_with(|| toml::Value::Array(vec![c.ae_title.clone().into()]));
            round_trip.insert("results".into(), r.into());
        }
        for (name, table) in [("priors", &self.priors), ("urgent", &self.urgent)] {
            if let Some(v) = table {
                round_trip.insert(name.into(), v.clone().into());
            }
        }
        if !round_trip.is_empty() {
            t += "\n";
            t += &toml::to_string(&round_trip).unwrap_or_default();
        }
        if let Some(n) = &self.network {
            t += "\n[network]\n";
            if !n.dns.is_empty() {
                t += &format!("dns = {}\n", list(&n.dns));
            }
            if !n.ntp.is_empty() {
                t += &format!("ntp = {}\n", list(&n.ntp));
            }
            for (side, p) in [("lan", &n.lan), ("wan", &n.wan)] {
                t += &format!(
                    "\n[network.{side}]\ninterface = {}\naddress = {}\n",
                    q(&p.interface),
                    q(&p.address)
                );
                if let Some(g) = &p.gateway {
                    t += &format!("gateway = {}\n", q(g));
                }
            }
        }
        t += "\n[tpm]\n";
        match self.tpm.backend.as_deref() {
            Some("software") => t += "backend = \"software\"   # development only\n",
            other => {
                if let Some(b) = other {
                    t += &format!("backend = {}\n", q(b));
                }
                t += &format!(
                    "tcti = {}\n",
                    q(self.tpm.tcti.as_deref().unwrap_or("device:/dev/tpmrm0"))
                );
            }
        }
        let software = self.tpm.backend.as_deref() == Some("software");
        match &self.tpm.pcrs {
            None if !software => {
                t += "pcrs = [7]   # the Secure Boot state: kept by signed updates, not by another system\n"
            }
            Some(p) if !p.is_empty() => t += &format!("pcrs = {p:?}\n"),
            _ => {}
        }
        t += &format!(
            "key_dir = {}\n",
            q(self
                .tpm
                .key_dir
                .as_deref()
                .unwrap_or("/var/lib/kakehashi/keys"))
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, KeyBackend};

    #[test]
    fn the_example_site_file_makes_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../provisioning/site.toml");
        let site = Site::load(&path).expect("provisioning/site.toml parses");
        let text = site.config_text(&path);
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.dicom.sources[0].port, Some(104));
        assert!(config.destinations[0].via_tunnel);
        let t = config.tunnel.expect("tunnel");
        assert!(
            t.private_key_file.is_none(),
            "the key is sealed, not a file"
        );
        assert_eq!(
            config.tpm.expect("tpm").backend,
            KeyBackend::Tpm {
                tcti: "device:/dev/tpmrm0".into()
            }
        );
    }

    #[test]
    fn the_round_trip_sections_reach_the_config() {
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../provisioning/site.toml"),
        )
        .expect("example");
        let text = format!(
            "{base}\n[results]\n\n[priors]\nmax_studies = 3\n\n[urgent]\ncodes = [\"SCT:36118008\"]\n[urgent.email]\nrelay = \"192.168.10.25:25\"\nfrom = \"kakehashi@hospital.example\"\nto = [\"er@hospital.example\"]\n"
        );
        let site = Site::parse(&text).expect("parses");
        let config_text = site.config_text(Path::new("site.toml"));
        let config = Config::parse(&config_text).unwrap_or_else(|e| panic!("{e}\n{config_text}"));
        let pacs = config.pacs.expect("[pacs] from [[pacs]]");
        assert_eq!(pacs.ae_title.as_str(), "HOSPITAL_PACS");
        assert_eq!(pacs.address, "192.168.10.20:104");
        let r = config.results.expect("[results]");
        assert_eq!(r.listen.to_string(), "10.8.0.2:11114");
        assert_eq!(r.from[0].as_str(), "READCENTER");
        assert_eq!(config.priors.expect("[priors]").max_studies, 3);
        assert!(config.urgent.is_some());
        // A typo inside a copied section is the config's error, naming it.
        let typo = text.replace("max_studies", "max_studys");
        let bad = Site::parse(&typo)
            .expect("parses")
            .config_text(Path::new("site.toml"));
        let e = Config::parse(&bad).expect_err("typo").to_string();
        assert!(e.contains("max_studys"), "{e}");
        let no_pacs = text.replace(
            "[[pacs]]\nae_title = \"HOSPITAL_PACS\"\naddress = \"192.168.10.20\"\nport = 104\n",
            "",
        );
        assert!(Site::parse(&no_pacs)
            .expect_err("no pacs")
            .contains("[[pacs]]"));
    }

    #[test]
    fn sealed_keys_are_bound_to_the_secure_boot_state_unless_the_site_says_otherwise() {
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../provisioning/site.toml"),
        )
        .expect("example");
        let pcrs = |extra: &str| {
            let text = base.replace("[tpm]", &format!("[tpm]\n{extra}"));
            let site = Site::parse(&text).expect("parses");
            let config = Config::parse(&site.config_text(Path::new("site.toml"))).expect("config");
            config.tpm.expect("tpm").pcrs
        };
        assert_eq!(pcrs(""), vec![7]);
        assert_eq!(pcrs("pcrs = []"), Vec::<u8>::new());
        assert_eq!(pcrs("pcrs = [0, 7]"), vec![0, 7]);
        assert_eq!(pcrs("backend = \"software\""), Vec::<u8>::new());
    }

    #[test]
    fn a_bad_site_file_names_the_problem() {
        let dir = std::env::temp_dir().join(format!("kk-site-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("site.toml");
        std::fs::write(
            &path,
            "[site]\nname = \"x\"\n[box]\ntunel_address = \"10.8.0.2/24\"\n",
        )
        .expect("write");
        let e = Site::load(&path).expect_err("typo").to_string();
        assert!(e.contains("tunel_address"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
