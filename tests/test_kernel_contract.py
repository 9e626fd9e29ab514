"""ebpf/kalki.h against appliance/dataplane/maps.py, field by field: no root, no bcc, no compiler.

The loader compares map key/value sizes with the kernel at start. Sizes alone miss two fields swapped, a
type changed for another of the same size, a renumbered flag bit or reason code. This test reads the
header with a small parser (it is plain C: structs of fixed-width fields, integer #defines, one enum) and
compares every struct, field type, offset and constant with the ctypes mirror, in both directions.
"""
import ctypes
import re
from pathlib import Path

import pytest

from appliance.dataplane import maps

EBPF = Path(__file__).resolve().parents[1] / "ebpf"

# C type -> (size, ctypes name). ctypes has no byte order in its types: __be* are plain unsigned.
SCALARS = {
    "__u8": (1, "c_uint8"), "__s8": (1, "c_int8"),
    "__u16": (2, "c_uint16"), "__s16": (2, "c_int16"), "__be16": (2, "c_uint16"),
    "__u32": (4, "c_uint32"), "__s32": (4, "c_int32"), "__be32": (4, "c_uint32"),
    "__u64": (8, "c_uint64"), "__s64": (8, "c_int64"), "__be64": (8, "c_uint64"),
    # { __u32 val; } in linux/bpf.h; maps.DevState holds it as a c_uint32.
    "struct bpf_spin_lock": (4, "c_uint32"),
}
# ctypes.c_uint32 is c_uint (and so on): name the fixed-width alias, as maps.py spells it.
CTYPE_NAMES = {getattr(ctypes, name): name for _, name in SCALARS.values()}

# #defines in kalki.h that user space does not mirror, and why.
KERNEL_ONLY = {
    "KALKI_RINGBUF_PAGES": "the ring buffer's size is a compile-time choice; bpf.RingBuffer reads it from "
                           "the map",
}
# Structs maps.py mirrors from dispatcher.bpf.c, not kalki.h: state private to the kernel program that
# user space only zeroes for a new device. Compared too, but maps.py may name the padding the C
# compiler inserts implicitly, so only C's fields, their offsets and sizeof must agree.
FROM_DISPATCHER = ("dev_state", "event_limit")


def class_name(struct):
    """The maps.py class of a C struct: kalki_allow_rule -> AllowRule, dev_state -> DevState."""
    return "".join(word.capitalize() for word in struct.removeprefix("kalki_").split("_"))


def python_name(const):
    """The maps.py name of a C constant: KALKI_F_PRESENT -> Flag.PRESENT, KALKI_R_SPOOF -> Reason.SPOOF,
    KALKI_A_DROPPED -> Action.DROPPED, KALKI_LOGIN_PORTS -> LOGIN_PORTS."""
    if const == "KALKI_R_MAX":
        return "REASON_SLOTS"   # not a reason: the counters' and event limits' slots per device
    m = re.fullmatch(r"KALKI_([FRA])_(\w+)", const)
    if m:
        return {"F": "Flag", "R": "Reason", "A": "Action"}[m[1]] + "." + m[2]
    return const.removeprefix("KALKI_")


def strip_comments(text):
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.DOTALL)


def parse_structs(text):
    """{name: [(C type, field, array length or None)]} for every `struct NAME { ... };` in text.
    A packed struct (`} __attribute__((packed));`) does not match: none is mirrored, and a mirrored one
    would then show up as missing rather than be laid out wrongly."""
    structs = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{([^{}]*)\}\s*;", strip_comments(text)):
        structs[name] = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.fullmatch(r"(struct\s+\w+|\w+)\s+(.+)", decl, re.DOTALL)
            declarators = [re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(\w+)\s*\])?\s*", d)
                           for d in (m[2].split(",") if m else [""])]
            if not all(declarators):
                raise ValueError(f"struct {name}: cannot read the field '{decl}'; teach the parser")
            c_type = " ".join(m[1].split())
            structs[name] += [(c_type, d[1], d[2]) for d in declarators]
    return structs


def parse_constants(text):
    """{NAME: value} from `#define NAME 8`, `#define NAME (1u << 3)` and the entries of every enum."""
    text = strip_comments(text)
    constants = {}
    for name, value in re.findall(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(\S.*?)\s*$", text, re.MULTILINE):
        m = re.fullmatch(r"\(?\s*(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*(?:<<\s*(\d+)\s*)?\)?", value)
        if not m:
            raise ValueError(f"#define {name} {value}: not an integer this parser reads; teach it")
        constants[name] = int(m[1], 0) << int(m[2] or 0)
    for body in re.findall(r"enum\s+\w+\s*\{([^{}]*)\}", text):
        value = 0
        for entry in filter(None, (e.strip() for e in body.split(","))):
            name, _, explicit = (part.strip() for part in entry.partition("="))
            value = int(explicit, 0) if explicit else value   # C: an entry without = is the last + 1
            constants[name] = value
            value += 1
    return constants


def layout(name, structs, constants):
    """(fields, sizeof, alignment) of a struct under natural alignment: the layout of BPF, and of user
    space on 64-bit and ARM EABI. fields are (field, C type, expected ctypes type, offset), types as text."""
    fields, offset, align = [], 0, 1
    for c_type, field, length in structs[name]:
        if c_type in SCALARS:
            size, py_type = SCALARS[c_type]
            field_align = size
        elif c_type.removeprefix("struct ") in structs:
            nested = c_type.removeprefix("struct ")
            _, size, field_align = layout(nested, structs, constants)
            py_type = class_name(nested)
        else:
            raise ValueError(f"struct {name} field '{field}': unknown C type {c_type}; teach the parser")
        if length is not None:
            n = int(length) if length.isdigit() else constants[length]
            c_type, py_type, size = f"{c_type}[{n}]", f"{py_type}[{n}]", size * n
        offset = -(-offset // field_align) * field_align
        fields.append((field, c_type, py_type, offset))
        offset += size
        align = max(align, field_align)
    return fields, -(-offset // align) * align, align


def describe(ctype):
    if issubclass(ctype, ctypes.Array):
        return f"{describe(ctype._type_)}[{ctype._length_}]"
    return CTYPE_NAMES.get(ctype, ctype.__name__)


def struct_problems(name, structs, constants, cls, source, same_names=True):
    fields, size, _ = layout(name, structs, constants)
    mirror = {field: (ctype, getattr(cls, field).offset) for field, ctype in cls._fields_}
    problems = []
    c_names, py_names = [f[0] for f in fields], list(mirror)
    if same_names and c_names != py_names:
        problems.append(f"struct {name} fields: {source} has {c_names}, maps.py has {py_names}")
    for field, c_type, py_type, offset in fields:
        where = f"struct {name} field '{field}'"
        if field not in mirror:
            problems.append(f"{where}: not in maps.py {cls.__name__}")
            continue
        ctype, py_offset = mirror[field]
        if describe(ctype) != py_type:
            problems.append(f"{where}: {source} says {c_type}, maps.py says {describe(ctype)}")
        if py_offset != offset:
            problems.append(f"{where}: offset {offset} in {source}, {py_offset} in maps.py")
    if ctypes.sizeof(cls) != size:
        problems.append(f"struct {name}: sizeof {size} in {source}, {ctypes.sizeof(cls)} in maps.py")
    return problems


def python_constants(m):
    """{name: value} of maps.py's integer constants and of every Flag, Reason and Action member."""
    out = {name: v for name, v in vars(m).items() if name.isupper() and isinstance(v, int)}
    for group in (m.Flag, m.Reason, m.Action):
        out.update({f"{group.__name__}.{name}": int(v) for name, v in group.__members__.items()})
    return out


def contract_problems(header, dispatcher, m):
    """Every disagreement between kalki.h (and the structs of dispatcher.bpf.c maps.py mirrors) and the
    maps module m, as readable lines; [] when they agree."""
    structs, constants, problems = parse_structs(header), parse_constants(header), []
    classes = {n: c for n, c in vars(m).items() if isinstance(c, type) and issubclass(c, ctypes.Structure)}
    for name in structs:
        if class_name(name) not in classes:
            problems.append(f"struct {name} in kalki.h has no mirror {class_name(name)} in maps.py")
        else:
            problems += struct_problems(name, structs, constants, classes[class_name(name)], "kalki.h")
    private = {**structs, **parse_structs(dispatcher)}
    for name in FROM_DISPATCHER:
        if name not in private or class_name(name) not in classes:
            problems.append(f"struct {name}: not in dispatcher.bpf.c, or no {class_name(name)} in maps.py")
        else:
            problems += struct_problems(name, private, constants, classes[class_name(name)],
                                        "dispatcher.bpf.c", same_names=False)
    for cls in classes.keys() - {class_name(n) for n in [*structs, *FROM_DISPATCHER]}:
        problems.append(f"maps.py {cls} mirrors no struct of kalki.h (nor FROM_DISPATCHER)")

    py_constants = python_constants(m)
    for name, value in constants.items():
        py = python_name(name)
        if py in py_constants and py_constants[py] != value:
            problems.append(f"{name}: kalki.h says {value}, maps.py {py} says {py_constants[py]}")
        elif py not in py_constants and name not in KERNEL_ONLY:
            problems.append(f"{name} = {value} in kalki.h has no mirror {py} in maps.py")
    for py in py_constants.keys() - {python_name(n) for n in constants}:
        problems.append(f"maps.py {py} = {py_constants[py]} has no constant in kalki.h")

    # The header names each map in a `map: NAME` comment; the loader pins and opens them by these names.
    for map_name in re.findall(r"\bmap:\s*(\w+)", header):
        if map_name not in m.MAPS and map_name != m.RINGBUF:
            problems.append(f"map {map_name} in kalki.h is not in maps.MAPS nor maps.RINGBUF")
    return problems


HEADER = (EBPF / "kalki.h").read_text()
DISPATCHER = (EBPF / "dispatcher.bpf.c").read_text()


def test_maps_py_mirrors_kalki_h_field_by_field():
    problems = contract_problems(HEADER, DISPATCHER, maps)
    assert not problems, "ebpf/kalki.h and maps.py disagree:\n" + "\n".join(problems)


# Each edit of a copy of a source (never the file itself) must be reported, by struct and field.
@pytest.mark.parametrize("source, old, new, expected", [
    ("header", "__u16 posture;", "__u8 posture;",
     "struct kalki_device field 'posture': kalki.h says __u8, maps.py says c_uint16"),
    # same size, so the loader's size check passes
    ("header", "__u32 device;\n\t__u32 reason;\n}", "__u32 reason;\n\t__u32 device;\n}",
     "struct kalki_drop field 'device': offset 12 in kalki.h, 8 in maps.py"),
    ("header", "__u32 flags;", "__s32 flags;",
     "struct kalki_device field 'flags': kalki.h says __s32, maps.py says c_uint32"),
    ("header", "kalki_allow_value {\n\t__u32 count;\n\tstruct kalki_allow_rule rules[",
     "kalki_allow_value {\n\t__u32 count;\n\tstruct kalki_allow_key rules[",
     "struct kalki_allow_value field 'rules': kalki.h says struct kalki_allow_key[8], "
     "maps.py says AllowRule[8]"),
    ("header", "__u32 lan_mask;", "__u32 lan_mask;\n\t__u32 wan_mask;",
     "struct kalki_settings field 'wan_mask': not in maps.py Settings"),
    ("header", "#define KALKI_LOGIN_PORTS 4", "#define KALKI_LOGIN_PORTS 5",
     "KALKI_LOGIN_PORTS: kalki.h says 5, maps.py LOGIN_PORTS says 4"),
    ("header", "(1u << 9)", "(1u << 12)",
     "KALKI_F_ANTI_SPOOF: kalki.h says 4096, maps.py Flag.ANTI_SPOOF says 512"),
    # an enum entry removed renumbers the ones after it
    ("header", "\tKALKI_R_SPOOF,\n", "", "KALKI_R_LATERAL: kalki.h says 4, maps.py Reason.LATERAL says 5"),
    ("header", "KALKI_R_MAX = 16", "KALKI_R_MAX = 32",
     "KALKI_R_MAX: kalki.h says 32, maps.py REASON_SLOTS says 16"),
    ("header", "#define KALKI_A_BLOCKED  2", "#define KALKI_A_BLOCKED  2\n#define KALKI_A_LOGGED 3",
     "KALKI_A_LOGGED = 3 in kalki.h has no mirror Action.LOGGED in maps.py"),
    ("header", "#define KALKI_A_BLOCKED  2", "", "maps.py Action.BLOCKED = 2 has no constant in kalki.h"),
    ("header", "struct kalki_counter {", "struct kalki_counters {",
     "maps.py Counter mirrors no struct of kalki.h"),
    ("header", "struct kalki_counter {", "struct kalki_spare { __u32 x; };\nstruct kalki_counter {",
     "struct kalki_spare in kalki.h has no mirror Spare in maps.py"),
    ("header", "map: kalki_drop_set,", "map: kalki_drops,", "map kalki_drops in kalki.h is not in maps.MAPS"),
    ("dispatcher", "__u64 byte_tat;", "__u32 byte_tat;",
     "struct dev_state field 'byte_tat': dispatcher.bpf.c says __u32, maps.py says c_uint64"),
])
def test_a_drift_is_reported(source, old, new, expected):
    texts = {"header": HEADER, "dispatcher": DISPATCHER}
    assert texts[source].count(old) == 1, f"the edit must hit exactly one place in {source}: {old!r}"
    texts[source] = texts[source].replace(old, new)
    problems = contract_problems(texts["header"], texts["dispatcher"], maps)
    assert any(p.startswith(expected) for p in problems), "\n".join(problems)
