// Colour maps and the painters of the overlays, applied in the page: changing the map, the view or the
// opacity never needs a new request.
//
// viridis, inferno, turbo and coolwarm are matplotlib's 256-entry tables (matplotlib 3.x, sampled at i/255):
// viridis and inferno by Nathaniel Smith and Stefan van der Walt (CC0), turbo by Anton Mikhailov (Google,
// Apache-2.0), coolwarm by Kenneth Moreland (a diverging map, for signed attributions). jet keeps the anchor
// colours of the server's overlays (service/imaging.py), for those used to it; it is not perceptually uniform.

const HEX = {
  viridis: (
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769" +
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a" +
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85" +
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b" +
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d" +
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e" +
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e" +
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d" +
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88" +
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81" +
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74" +
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863" +
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d" +
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32" +
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a" +
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725"),
  inferno: (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722" +
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48" +
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964" +
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d" +
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e" +
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a" +
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62" +
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655" +
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545" +
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933" +
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f" +
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a" +
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f" +
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932" +
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865" +
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"),
  turbo: (
    "30123b32154333184a341b51351e5836215f37246638276d392a733a2d793b2f803c32863d358b3e38913f3b973f3e9c" +
    "4040a24143a74146ac4249b1424bb5434eba4451bf4454c34456c74559cb455ccf455ed34661d64664da4666dd4669e0" +
    "466be3476ee64771e94773eb4776ee4778f0477bf2467df44680f64682f84685fa4687fb458afc458cfd448ffe4391fe" +
    "4294ff4196ff4099ff3e9bfe3d9efe3ba0fd3aa3fc38a5fb37a8fa35abf833adf731aff52fb2f42eb4f22cb7f02ab9ee" +
    "28bceb27bee925c0e723c3e422c5e220c7df1fc9dd1ecbda1ccdd81bd0d51ad2d21ad4d019d5cd18d7ca18d9c818dbc5" +
    "18ddc218dec018e0bd19e2bb19e3b91ae4b61ce6b41de7b21fe9af20eaac22ebaa25eca727eea42aefa12cf09e2ff19b" +
    "32f29835f39438f4913cf58e3ff68a43f78746f8844af8804ef97d52fa7a55fa7659fb735dfc6f61fc6c65fd6969fd66" +
    "6dfe6271fe5f75fe5c79fe597dff5680ff5384ff5188ff4e8bff4b8fff4992ff4796fe4499fe429cfe409ffd3fa1fd3d" +
    "a4fc3ca7fc3aa9fb39acfb38affa37b1f936b4f836b7f735b9f635bcf534bef434c1f334c3f134c6f034c8ef34cbed34" +
    "cdec34d0ea34d2e935d4e735d7e535d9e436dbe236dde037dfdf37e1dd37e3db38e5d938e7d739e9d539ebd339ecd13a" +
    "eecf3aefcd3af1cb3af2c93af4c73af5c53af6c33af7c13af8be39f9bc39faba39fbb838fbb637fcb336fcb136fdae35" +
    "fdac34fea933fea732fea431fea130fe9e2ffe9b2dfe992cfe962bfe932afe9029fd8d27fd8a26fc8725fc8423fb8122" +
    "fb7e21fa7b1ff9781ef9751df8721cf76f1af66c19f56918f46617f36315f26014f15d13f05b12ef5811ed5510ec530f" +
    "eb500eea4e0de84b0ce7490ce5470be4450ae2430ae14109df3f08dd3d08dc3b07da3907d83706d63506d43305d23105" +
    "d02f05ce2d04cc2b04ca2a04c82803c52603c32503c12302be2102bc2002b91e02b71d02b41b01b21a01af1801ac1701" +
    "a91601a71401a41301a112019e10019b0f01980e01950d01920b018e0a018b09028808028507028106027e05027a0403"),
  coolwarm: (
    "3b4cc03c4ec23d50c33e51c53f53c64055c84257c94358cb445acc455cce465ecf485fd14961d24a63d34b64d54c66d6" +
    "4e68d84f69d9506bda516ddb536edd5470de5572df5673e05875e15977e35a78e45b7ae55d7ce65e7de75f7fe86180e9" +
    "6282ea6384eb6485ec6687ed6788ee688aef6a8bef6b8df06c8ff16e90f26f92f37093f37295f47396f57597f67699f6" +
    "779af7799cf87a9df87b9ff97da0f97ea1fa80a3fa81a4fb82a6fb84a7fc85a8fc86a9fc88abfd89acfd8badfd8caffe" +
    "8db0fe8fb1fe90b2fe92b4fe93b5fe94b6ff96b7ff97b8ff98b9ff9abbff9bbcff9dbdff9ebeff9fbfffa1c0ffa2c1ff" +
    "a3c2fea5c3fea6c4fea7c5fea9c6fdaac7fdabc8fdadc9fdaec9fcafcafcb1cbfcb2ccfbb3cdfbb5cdfab6cefab7cff9" +
    "b9d0f9bad0f8bbd1f8bcd2f7bed2f6bfd3f6c0d4f5c1d4f4c3d5f4c4d5f3c5d6f2c6d6f1c7d7f0c9d7f0cad8efcbd8ee" +
    "ccd9edcdd9eccedaebcfdaead1dae9d2dbe8d3dbe7d4dbe6d5dbe5d6dce4d7dce3d8dce2d9dce1dadce0dbdcdedcdddd" +
    "dddcdcdedcdbdfdbd9e0dbd8e1dad6e2dad5e3d9d3e4d9d2e5d8d1e6d7cfe7d7cee8d6cce9d5cbead5c9ead4c8ebd3c6" +
    "ecd3c5edd2c3edd1c2eed0c0efcfbfefcebdf0cdbbf1cdbaf1ccb8f2cbb7f2cab5f2c9b4f3c8b2f3c7b1f4c6aff4c5ad" +
    "f5c4acf5c2aaf5c1a9f5c0a7f6bfa6f6bea4f6bda2f7bca1f7ba9ff7b99ef7b89cf7b79bf7b599f7b497f7b396f7b194" +
    "f7b093f7af91f7ad90f7ac8ef7aa8cf7a98bf7a889f7a688f6a586f6a385f6a283f5a081f59f80f59d7ef59c7df49a7b" +
    "f4987af39778f39577f39475f29274f29072f18f71f18d6ff08b6ef08a6cef886bee8669ee8468ed8366ec8165ec7f63" +
    "eb7d62ea7b60e97a5fe9785de8765ce7745be67259e57058e46e56e36c55e36b54e26952e16751e0654fdf634ede614d" +
    "dd5f4bdc5d4ada5a49d95847d85646d75445d65244d55042d44e41d24b40d1493fd0473dcf453ccd423bcc403acb3e38" +
    "ca3b37c83836c73635c53334c43032c32e31c12b30c0282fbe242ebd1f2dbb1b2cba162bb8122ab70d28b50927b40426"),
};

const JET = [[0, "#000080"], [0.125, "#0000ff"], [0.375, "#00ffff"], [0.625, "#ffff00"], [0.875, "#ff0000"],
             [1, "#800000"]];

/** The colour maps offered for the sequential (unsigned) maps; the first is the default. */
export const COLORMAP_NAMES = ["viridis", "inferno", "turbo", "jet", "gray"];
/** The map for signed attributions: blue negative, red positive. */
export const DIVERGING = "coolwarm";

const tables = new Map();

function fromHex(hex) {
  const table = new Uint8Array(768);
  for (let i = 0; i < 768; i++) table[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return table;
}

function fromAnchors(anchors) {
  const table = new Uint8Array(768);
  const rgb = (c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16));
  for (let level = 0; level < 256; level++) {
    const x = level / 255;
    let k = 0;
    while (k < anchors.length - 2 && x > anchors[k + 1][0]) k++;
    const [x0, c0] = anchors[k];
    const [x1, c1] = anchors[k + 1];
    const t = Math.min(1, Math.max(0, (x - x0) / (x1 - x0)));
    const [a, b] = [rgb(c0), rgb(c1)];
    for (let ch = 0; ch < 3; ch++) table[level * 3 + ch] = Math.round(a[ch] + t * (b[ch] - a[ch]));
  }
  return table;
}

/** 256 RGB entries (a Uint8Array of 768). */
export function lookupTable(name) {
  if (!tables.has(name)) {
    if (HEX[name]) tables.set(name, fromHex(HEX[name]));
    else if (name === "jet") tables.set(name, fromAnchors(JET));
    else if (name === "gray") tables.set(name, fromAnchors([[0, "#000000"], [1, "#ffffff"]]));
    else throw new Error(`unknown colour map ${name}`);
  }
  return tables.get(name);
}

// Each painter fills `out` (an ImageData's RGBA bytes) with an overlay drawn over the photo. With `photo`
// false the overlay is the whole picture: opaque.

// Opacity rises with the value as value^GAMMA: linear left the mid values of fine-grained maps (a gradient's,
// most of whose pixels sit low after the server's percentile clip) too faint to see at a glance.
const GAMMA = 0.6;
const ALPHA = Uint8Array.from({ length: 256 }, (_, v) => Math.round(255 * (v / 255) ** GAMMA));

/** The map in colour, its opacity following its value: the unimportant parts leave the photo as it is (at a
 * fixed opacity the whole photo took the colour of the lowest value). */
export function paintHeat(gray, table, opacity, out, photo = true) {
  for (let i = 0, j = 0; i < gray.length; i++, j += 4) {
    const v = gray[i];
    const k = v * 3;
    out[j] = table[k];
    out[j + 1] = table[k + 1];
    out[j + 2] = table[k + 2];
    out[j + 3] = photo ? Math.round(opacity * ALPHA[v]) : 255;
  }
}

/** The smallest level whose pixels and those above it make at least `fraction` of the map. */
export function topLevel(gray, fraction) {
  const counts = new Uint32Array(256);
  for (let i = 0; i < gray.length; i++) counts[gray[i]]++;
  const wanted = fraction * gray.length;
  let total = 0;
  for (let level = 255; level > 0; level--) {
    total += counts[level];
    if (total >= wanted) return level;
  }
  return 1; // never the zeros: a map with fewer lit pixels than asked shows them all
}

/** The top pixels (gray >= level) as they are, the rest dimmed. No outline: around the speckles of a
 * fine-grained map (a gradient's) an outline would outweigh the pixels it surrounds. */
export function paintTop(gray, level, table, out, photo = true) {
  for (let i = 0, j = 0; i < gray.length; i++, j += 4) {
    if (gray[i] < level) {
      out[j] = out[j + 1] = out[j + 2] = photo ? 0 : 40;
      out[j + 3] = photo ? 175 : 255;
    } else {
      const k = gray[i] * 3;
      out[j] = table[k];
      out[j + 1] = table[k + 1];
      out[j + 2] = table[k + 2];
      out[j + 3] = photo ? 0 : 255;
    }
  }
}

/** A signed map (values in [-1, 1]): the diverging map's two ends, blue for negative and red for positive,
 * their opacity following |value|, over the photo faded towards white (white without the photo). Over the
 * photo as it is, the fine signed speckles of a gradient were lost in its texture; and on white, an end colour
 * at opacity a is the diverging map's colour at a, so the colour bar reads true. */
export function paintSigned(signed, table, opacity, out, photo = true) {
  const veil = photo ? 0.55 : 1;
  const ends = [[table[0], table[1], table[2]], [table[765], table[766], table[767]]];
  for (let i = 0, j = 0; i < signed.length; i++, j += 4) {
    const v = Math.max(-1, Math.min(1, signed[i]));
    const a = opacity * Math.abs(v) ** GAMMA;
    const c = ends[v < 0 ? 0 : 1];
    const white = veil * (1 - a);
    const total = a + white;
    out[j] = (a * c[0] + white * 255) / total;
    out[j + 1] = (a * c[1] + white * 255) / total;
    out[j + 2] = (a * c[2] + white * 255) / total;
    out[j + 3] = Math.round(255 * total);
  }
}

/** Draw RGBA `over` onto RGBA `image` in place (source-over), as the canvas does on screen. */
export function compositeOver(image, over) {
  for (let j = 0; j < image.length; j += 4) {
    const a = over[j + 3] / 255;
    const keep = 1 - a;
    image[j] = keep * image[j] + a * over[j];
    image[j + 1] = keep * image[j + 1] + a * over[j + 1];
    image[j + 2] = keep * image[j + 2] + a * over[j + 2];
    image[j + 3] = 255;
  }
}
