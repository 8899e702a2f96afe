//! `apiward-sidecar init`: the iptables (nat) rules that make interception transparent.
//! Inbound TCP goes to the inbound listener (15006), the app's outbound TCP to the outbound
//! listener (15001). Excluded: the sidecar's own UID (its connections to the app and to the
//! world), loopback destinations, the admin port, and configured ports and CIDRs.
//!
//! Run it in the pod's network namespace before the app starts (an init container with
//! `NET_ADMIN`). It is idempotent: the apiward chains are created or flushed and refilled,
//! and the jumps into them are added only when missing. `--dry-run` prints the rules
//! instead; `--remove` takes them out again.

use std::process::Command;

/// The chain inbound packets jump to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "APIWARD_INBOUND";
/// The chain the app's packets jump to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "APIWARD_OUTPUT";

/// What to intercept (also the `apiward-sidecar init` flags).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct InitOptions {
    /// The inbound listener's port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The outbound listener's port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The UID the sidecar runs as (its traffic is never redirected).
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The admin port (reached directly by kubelet probes and Prometheus).
    #[arg(long, default_value_t = 15020)]
    pub admin_port: u16,
    /// Only these inbound ports are redirected (comma-separated; empty: all).
    #[arg(long, value_delimiter = ',')]
    pub inbound_ports: Vec<u16>,
    /// Inbound ports never redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<ipnet::IpNet>,
    /// IPv6 rules (ip6tables) rather than IPv4.
    #[arg(long)]
    pub ipv6: bool,
}

/// One rule: the chain and the match/target arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Chain the rule is appended to.
    pub chain: &'static str,
    /// Everything after `-A <chain>`.
    pub args: Vec<String>,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "-A {} {}", self.chain, self.args.join(" "))
    }
}

fn rule(chain: &'static str, args: &[&str]) -> Rule {
    Rule {
        chain,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
    }
}

impl InitOptions {
    /// The rules inside the apiward chains, in order.
    pub fn chain_rules(&self) -> Vec<Rule> {
        let mut out = Vec::new();
        let admin = self.admin_port.to_string();
        out.push(rule(
            INBOUND_CHAIN,
            &["-p", "tcp", "--dport", &admin, "-j", "RETURN"],
        ));
        for p in &self.exclude_inbound_ports {
            let p = p.to_string();
            out.push(rule(
                INBOUND_CHAIN,
                &["-p", "tcp", "--dport", &p, "-j", "RETURN"],
            ));
        }
        let to_in = self.inbound_port.to_string();
        if self.inbound_ports.is_empty() {
            out.push(rule(
                INBOUND_CHAIN,
                &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to_in],
            ));
        } else {
            for p in &self.inbound_ports {
                let p = p.to_string();
                out.push(rule(
                    INBOUND_CHAIN,
                    &[
                        "-p",
                        "tcp",
                        "--dport",
                        &p,
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &to_in,
                    ],
                ));
            }
        }
        let uid = self.proxy_uid.to_string();
        out.push(rule(
            OUTPUT_CHAIN,
            &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
        ));
        let loopback = if self.ipv6 { "::1/128" } else { "127.0.0.0/8" };
        out.push(rule(OUTPUT_CHAIN, &["-d", loopback, "-j", "RETURN"]));
        for c in &self.exclude_outbound_cidrs {
            if c.addr().is_ipv6() == self.ipv6 {
                let c = c.to_string();
                out.push(rule(OUTPUT_CHAIN, &["-d", &c, "-j", "RETURN"]));
            }
        }
        for p in &self.exclude_outbound_ports {
            let p = p.to_string();
            out.push(rule(
                OUTPUT_CHAIN,
                &["-p", "tcp", "--dport", &p, "-j", "RETURN"],
            ));
        }
        let to_out = self.outbound_port.to_string();
        out.push(rule(
            OUTPUT_CHAIN,
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to_out],
        ));
        out
    }

    /// The jumps from the built-in chains into the apiward chains.
    pub fn jumps() -> Vec<Rule> {
        vec![
            rule("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN]),
            rule("OUTPUT", &["-p", "tcp", "-j", OUTPUT_CHAIN]),
        ]
    }

    /// The rules as `iptables -t nat` would list them (for `--dry-run`).
    pub fn script(&self) -> String {
        let mut s = format!(
            "# {} -t nat\n-N {INBOUND_CHAIN}\n-N {OUTPUT_CHAIN}\n",
            self.binary()
        );
        for r in self.chain_rules().iter().chain(Self::jumps().iter()) {
            s.push_str(&format!("{r}\n"));
        }
        s
    }

    fn binary(&self) -> &'static str {
        if self.ipv6 { "ip6tables" } else { "iptables" }
    }
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The iptables binary could not be run.
    #[error(
        "cannot run {binary}: {source} (is iptables installed, and are we root with NET_ADMIN?)"
    )]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// iptables refused a command.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What iptables printed.
        stderr: String,
    },
}

/// Runs iptables; `Ok(false)` when it ran and said no (used for `-C` and `-L` probes).
fn iptables(binary: &str, args: &[&str], probe: bool) -> Result<bool, InitError> {
    let out = Command::new(binary)
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|source| InitError::Spawn {
            binary: binary.into(),
            source,
        })?;
    if out.status.success() {
        return Ok(true);
    }
    if probe {
        return Ok(false);
    }
    Err(InitError::Failed {
        command: format!("{binary} -t nat {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

fn rule_args<'a>(op: &'a str, r: &'a Rule) -> Vec<&'a str> {
    let mut a = vec![op, r.chain];
    a.extend(r.args.iter().map(String::as_str));
    a
}

/// Installs (or refreshes) the rules. Safe to run again: the result is the same.
pub fn install(opts: &InitOptions, binary: Option<&str>) -> Result<(), InitError> {
    let bin = binary.unwrap_or(opts.binary());
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        if iptables(bin, &["-L", chain, "-n"], true)? {
            iptables(bin, &["-F", chain], false)?;
        } else {
            iptables(bin, &["-N", chain], false)?;
        }
    }
    for r in opts.chain_rules() {
        iptables(bin, &rule_args("-A", &r), false)?;
    }
    for j in InitOptions::jumps() {
        if !iptables(bin, &rule_args("-C", &j), true)? {
            iptables(bin, &rule_args("-A", &j), false)?;
        }
    }
    Ok(())
}

/// Removes the jumps and the apiward chains (missing ones are skipped).
pub fn remove(ipv6: bool, binary: Option<&str>) -> Result<(), InitError> {
    let bin = binary.unwrap_or(if ipv6 { "ip6tables" } else { "iptables" });
    for j in InitOptions::jumps() {
        while iptables(bin, &rule_args("-C", &j), true)? {
            iptables(bin, &rule_args("-D", &j), false)?;
        }
    }
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        if iptables(bin, &["-L", chain, "-n"], true)? {
            iptables(bin, &["-F", chain], false)?;
            iptables(bin, &["-X", chain], false)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> InitOptions {
        InitOptions {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 1337,
            admin_port: 15020,
            inbound_ports: vec![],
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            ipv6: false,
        }
    }

    #[test]
    fn the_sidecar_uid_loopback_and_exclusions_come_before_the_redirects() {
        let s = opts().script();
        let expected = "\
# iptables -t nat
-N APIWARD_INBOUND
-N APIWARD_OUTPUT
-A APIWARD_INBOUND -p tcp --dport 15020 -j RETURN
-A APIWARD_INBOUND -p tcp --dport 22 -j RETURN
-A APIWARD_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A APIWARD_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A APIWARD_OUTPUT -d 127.0.0.0/8 -j RETURN
-A APIWARD_OUTPUT -d 10.96.0.0/12 -j RETURN
-A APIWARD_OUTPUT -p tcp --dport 5432 -j RETURN
-A APIWARD_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j APIWARD_INBOUND
-A OUTPUT -p tcp -j APIWARD_OUTPUT
";
        assert_eq!(s, expected);
    }

    #[test]
    fn ipv6_rules_keep_only_ipv6_exclusions_and_only_listed_inbound_ports_redirect() {
        let mut o = opts();
        o.ipv6 = true;
        o.inbound_ports = vec![8080, 9090];
        let s = o.script();
        assert!(s.starts_with("# ip6tables -t nat\n"));
        assert!(s.contains("-A APIWARD_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(s.contains("-A APIWARD_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!s.contains("10.96.0.0/12"));
        assert!(
            s.contains("-A APIWARD_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006\n")
        );
        assert!(
            s.contains("-A APIWARD_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006\n")
        );
        assert!(!s.contains("-A APIWARD_INBOUND -p tcp -j REDIRECT"));
    }
}
