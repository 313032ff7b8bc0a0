# docs/options.md, generated from the module's option declarations with lib.optionAttrSetToDocList
# (the function behind nixpkgs' nixosOptionsDoc). `cargo xtask nix-checks` checks the committed
# file against it, and rewrites it when RASA_UPDATE_DOCS=1 is set.
{ nixpkgsLib, nixosEval }:
let
  tool = import nixosEval { inherit nixpkgsLib; };
  inherit (tool) lib;
  root = toString ../..;
  options = (tool.eval [ ../../modules/rasa.nix ]).options.rasa;
  documented = lib.filter (o: o.visible && !o.internal) (lib.optionAttrSetToDocList options);
  code = v: if v ? text then v.text else builtins.toJSON v;
  block = label: v:
    let text = code v; in
    if lib.hasInfix "\n" text then "*${label}:*\n\n```nix\n${text}\n```\n" else "*${label}:* `${text}`\n";
  relative = file: lib.removePrefix "${root}/" (toString file);
  render = o: ''
    ## `${o.name}`

    ${lib.trim o.description}

    *Type:* ${o.type}

    ${lib.optionalString (o ? default) (block "Default" o.default)}
    ${lib.optionalString (o ? example) (block "Example" o.example)}
    *Declared in:* ${lib.concatMapStringsSep ", " (f: "[${relative f}](../${relative f})") o.declarations}
  '';
in
''
  # rasa's NixOS options

  Generated from the module (`modules/options.nix`, `modules/presets.nix`) by
  `tests/nix/options-doc.nix`; do not edit by hand. To regenerate:
  `RASA_UPDATE_DOCS=1 RASA_NIXPKGS_LIB=... RASA_IMPERMANENCE=... cargo xtask nix-checks`.

''
  + lib.concatMapStringsSep "\n" render documented
