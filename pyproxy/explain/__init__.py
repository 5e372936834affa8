"""Why a Service does or does not answer from this node: `pyproxy explain` and `pyproxy trace`.

"My Service does not answer" is the most common networking support question, and kube-proxy's
only answer is raw iptables-save output. pyproxy knows the desired state and the rules, so it can
answer in plain words. Nothing here decides anything on its own:

- which endpoints this node uses comes from `proxystate.service_state`, i.e. the same
  `policy.categorize_endpoints` the renderer uses; `endpoints` only *explains* an endpoint the
  policy left out (not ready, terminating, another node under a Local policy, a topology hint
  for another zone or node, no slice port of that name, another address family);
- what happens to a connection comes from running the packet tracer (`iptables.tracer`) over the
  rules pyproxy would program (the renderer's own output, assembled as a full sync does, with the
  jumps from the built-in chains), starting at PREROUTING/OUTPUT with conntrack state NEW, as
  the kernel would. Only the Services whose rules can match the traced packets are rendered
  (same result, see `service._family_rules`; a test checks it against the whole ruleset), so a
  rule is named by its chain and text, not by its position;
- drift compares the rules pyproxy would program with `iptables-save` output, chain by chain
  (`iptables.drift`, beside the parser it reads with).

Modules, in the order a report is built:

- `report`: the report model (`Explanation`, `PacketReport`) and its JSON schema;
- `endpoints`: which endpoints each service port uses on this node, and why not the others;
- `connections`: the addresses a client can use and the traced verdict for each;
- `diagnoses`: the misconfigurations named in plain words;
- `service`: one Service's report assembled (`explain_service`), and what pyproxy would
  program (`desired_document`);
- `packet`: one packet through iptables-save text, plus drift (`trace_saved`);
- `ipvs`: `--proxy-mode ipvs`: virtual servers, real servers, ipsets and their rules from the
  IPVS plan, the kernel's virtual server a packet meets, and IPVS drift (an additive `ipvs`
  key in the JSON);
- `format`: the text a terminal gets (tables, colour when on a TTY);
- `cli`: the shell: flags, loading the cluster state (state file or API server), printing.

All but `cli` are pure (no I/O); import-linter keeps them in the pure core.
"""
