# How systemd reads an ExecStart= line into the program's argv, for the tests: %-specifiers first
# ("%%" is "%"; any other specifier is marked «%x», as it would be replaced), then words split on
# blanks with '...' and "..." quotes and C escapes (\\ \" \' \n \t \s \xHH), then environment
# variables ("$$" is "$"; $NAME and ${NAME} are marked «$NAME»). An argument that reaches the
# program changed shows a marker or a different string. (systemd.service(5), "Command lines";
# systemd's config_parse_exec, extract_first_word with EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE.)
{ lib }:
line:
let
  chars = lib.stringToCharacters;
  printable = chars " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
  hexDigit = c: lib.toLower c;
  hexValue = s: lib.foldl' (n: c: n * 16 + (lib.lists.findFirstIndex (h: h == hexDigit c) null (chars "0123456789abcdef"))) 0 (chars s);
  byte = hex: let v = hexValue hex; in if v >= 32 && v < 127 then lib.elemAt printable (v - 32) else "«\\x${hex}»";

  # 1. specifiers
  specified =
    let
      step = acc: c:
        if acc.percent then acc // { percent = false; out = acc.out + (if c == "%" then "%" else "«%${c}»"); }
        else if c == "%" then acc // { percent = true; }
        else acc // { out = acc.out + c; };
    in
    (lib.foldl' step { percent = false; out = ""; } (chars line)).out;

  # 2. words, quotes, C escapes
  words =
    let
      simple = { n = "\n"; t = "\t"; s = " "; "\\" = "\\"; "\"" = "\""; "'" = "'"; a = "«\\a»"; };
      push = acc: acc // { words = acc.words ++ lib.optional acc.inWord acc.cur; cur = ""; inWord = false; };
      add = acc: s: acc // { cur = acc.cur + s; inWord = true; esc = null; };
      step = acc: c:
        if acc.esc == "\\" then (if c == "x" then acc // { esc = "x"; } else add acc (simple.${c} or "«\\${c}»"))
        else if acc.esc == "x" then acc // { esc = "x${c}"; }
        else if acc.esc != null then add acc (byte "${lib.removePrefix "x" acc.esc}${c}")
        else if c == "\\" then acc // { esc = "\\"; inWord = true; }
        else if acc.quote != null then (if c == acc.quote then acc // { quote = null; } else add acc c)
        else if c == "\"" || c == "'" then acc // { quote = c; inWord = true; }
        else if c == " " || c == "\t" then push acc
        else add acc c;
    in
    (push (lib.foldl' step { words = [ ]; cur = ""; inWord = false; quote = null; esc = null; } (chars specified))).words;

  # 3. environment variables
  expand = word:
    let
      parts = builtins.split "\\$(\\$|\\{[A-Za-z_][A-Za-z0-9_]*}|[A-Za-z_][A-Za-z0-9_]*)" word;
    in
    lib.concatMapStrings (p: if builtins.isList p then (if lib.head p == "$" then "$" else "«$" + lib.removeSuffix "}" (lib.removePrefix "{" (lib.head p)) + "»") else p) parts;
in
map expand words
