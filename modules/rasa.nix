# rasa's NixOS module (nixosModules.rasa; nixosModules.default adds impermanence): the options,
# what they do, and the presets, each a module of its own.
{
  # Importing this file by path and through the flake's nixosModules.rasa is one module.
  key = toString ./rasa.nix;
  _file = toString ./rasa.nix;
  imports = [ ./options.nix ./wiring.nix ./presets.nix ./state-check.nix ];
}
